"""One-source replicas trained for a few steps in this process: K = 0 of each is bitwise ``_seed0``, K = 1 and
K = 2 differ, and the same name trained twice gives the same weights, with 0 and with 2 augmentation workers.
``_nondet`` is refused on the CPU with its reason (its GPU run is not checked here)."""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from conftest import TINY, trainer_in_process
from nnunet_varaug.training.registry import resolve
from nnunet_varaug.training.seeding import allow_nondeterminism
from nnunet_varaug.utilities.errors import VarAugError

SOURCES = ("init", "order", "aug")


@pytest.fixture(scope="module")
def short_training(synthetic_3d, tmp_path_factory):
    """``train(name, workers, run=0)``: the flat weights after nnU-Net's own ``run_training`` of one epoch of 3
    steps (1 validation step), output in a private folder; cached by (name, workers, run)."""
    root = tmp_path_factory.mktemp("one_source")
    done = {}

    def train(name: str, workers: int, run: int = 0) -> torch.Tensor:
        if (name, workers, run) in done:
            return done[name, workers, run]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("nnUNet_n_proc_DA", str(workers))
            mp.setenv("VARAUG_TINY_EPOCHS", "1")
            mp.setenv("VARAUG_TINY_ITERATIONS", "3")
            trainer = trainer_in_process(name, synthetic_3d["name"], 0)
            folder = str(root / f"{name}_w{workers}_r{run}")
            os.makedirs(folder)
            trainer.output_folder = trainer.output_folder_base = folder
            trainer.log_file = os.path.join(folder, "training_log.txt")
            trainer.num_val_iterations_per_epoch = 1
            mp.setattr(trainer.logger, "plot_progress_png", lambda *a, **k: None)
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.run_training()
        done[name, workers, run] = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
        return done[name, workers, run]

    return train


@pytest.mark.e2e
@pytest.mark.parametrize("source", SOURCES)
def test_one_source_replicas_without_workers(short_training, source):
    """K = 0 is _seed0 bit for bit; K = 1 and K = 2 differ; K = 1 again is K = 1 bit for bit."""
    seed0 = short_training(f"{TINY}_seed0", 0)
    assert torch.equal(short_training(f"{TINY}_{source}0", 0), seed0)
    one, two = short_training(f"{TINY}_{source}1", 0), short_training(f"{TINY}_{source}2", 0)
    assert not torch.equal(one, two) and not torch.equal(one, seed0)
    assert torch.equal(short_training(f"{TINY}_{source}1", 0, run=1), one)


@pytest.mark.e2e
@pytest.mark.parametrize("source", SOURCES)
def test_one_source_replicas_with_two_workers(short_training, source):
    """With 2 augmentation workers: the same name twice gives the same weights, and differs from _seed0."""
    one = short_training(f"{TINY}_{source}1", 2)
    assert torch.equal(short_training(f"{TINY}_{source}1", 2, run=1), one)
    assert not torch.equal(one, short_training(f"{TINY}_seed0", 2))


@pytest.mark.e2e
def test_k0_with_two_workers_is_seed0(short_training):
    assert torch.equal(short_training(f"{TINY}_order0", 2), short_training(f"{TINY}_seed0", 2))


@pytest.mark.unit
def test_nondet_is_refused_on_the_cpu_with_the_reason():
    cls = resolve(f"{TINY}_nondet1")
    with pytest.raises(VarAugError, match=r"needs a CUDA GPU.*deterministic.*nnUNetTrainerTiny_seed0 again"):
        cls({}, "3d_fullres", 0, {}, device=torch.device("cpu"))


@pytest.mark.unit
def test_nondet_lets_the_gpu_choose_its_kernels():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert allow_nondeterminism() == {"deterministic_algorithms": False, "warn_only": False,
                                          "cudnn_deterministic": False, "cudnn_benchmark": True}
        instance = object.__new__(resolve(f"{TINY}_nondet3"))
        assert instance.configure_kernels()["cudnn_benchmark"] is True
        assert {s: instance.stream_seed(s) for s in instance.STREAMS} == {"init": 0, "order": 0, "aug": 0,
                                                                          "train": 0}
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
