"""What a seed replica arranges for deterministic GPU training, checked on the CPU: CUBLAS_WORKSPACE_CONFIG set
before nnU-Net's trainer is built, deterministic algorithms (warn-only) and cuDNN flags, torch.compile off unless
the user asks through nnUNet_compile, the warnings of ops without a deterministic kernel recorded. The GPU run
itself (same replica twice -> same weights) is benchmarks/gpu_determinism.py."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from nnunet_varaug.training.seeding import (CUBLAS_CONFIG, NondeterminismRecorder, compile_decision, configure_cublas,
                                   make_deterministic, platform_record)
from nnunet_varaug.training.trainers.replica import SeedReplicaMixin

pytestmark = pytest.mark.unit


@pytest.fixture
def torch_flags():
    """torch's global determinism flags, restored after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def nondeterministic_op() -> None:
    """An op that has no deterministic kernel on the CPU (torch alerts for put_ with accumulate=False)."""
    torch.zeros(4).put_(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), accumulate=False)


def test_cublas_config_set_unless_the_user_set_a_deterministic_one():
    env = {}
    assert configure_cublas(env)["set_by"] == "nnunet_varaug" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert configure_cublas(env)["set_by"] == "user" and env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    env = {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}  # not one of cuBLAS's deterministic settings
    record = configure_cublas(env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_CONFIG and "replaced the user's ':0:0'" in record["set_by"]


def test_compile_off_unless_the_user_sets_nnunet_compile():
    assert compile_decision({})[0] is False
    for value in ("t", "f", "1"):
        decided, reason = compile_decision({"nnUNet_compile": value})
        assert decided is None and f"nnUNet_compile={value}" in reason


def test_deterministic_algorithms_warn_only_and_cudnn(torch_flags):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # as nnU-Net leaves them
    assert make_deterministic() == {"deterministic_algorithms": True, "warn_only": True,
                                    "cudnn_deterministic": True, "cudnn_benchmark": False}
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn-only: an op without a deterministic kernel must not stop training
        with pytest.raises(UserWarning, match="does not have a deterministic implementation"):
            nondeterministic_op()


def test_recorder_keeps_each_alert_once_and_lets_other_warnings_through(torch_flags, recwarn):
    make_deterministic()
    recorder = NondeterminismRecorder().install()
    try:
        nondeterministic_op()
        nondeterministic_op()
        warnings.warn("something else", UserWarning)
    finally:
        recorder.uninstall()
    assert len(recorder.messages) == 1 and recorder.messages[0].startswith("put_ does not have a deterministic")
    nondeterministic_op()  # after uninstall: no longer recorded
    assert len(recorder.messages) == 1


class FakeTrainer:
    """Stands for nnUNetTrainer: records what it sees when built, and what it would compile."""

    compile_default = True

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        self.seen_cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        self.device = device
        self.current_epoch, self.local_rank = 0, 0
        self.output_folder = self.folder

    def _do_i_compile(self):
        return self.compile_default

    def on_train_start(self):
        pass

    def on_train_end(self):
        pass



def seed_trainer(folder):
    cls = type("FakeTrainer_seed1", (SeedReplicaMixin, FakeTrainer), {"replica_seed": 1, "folder": str(folder)})
    return cls({}, "3d_fullres", 0, {}, torch.device("cpu"))


def test_seed_replica_arranges_and_records_determinism(torch_flags, monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("nnUNet_compile", raising=False)
    (tmp_path / "debug.json").write_text("{}")  # as nnU-Net's on_train_start leaves it
    trainer = seed_trainer(tmp_path)
    assert trainer.seen_cublas == CUBLAS_CONFIG, "CUBLAS_WORKSPACE_CONFIG must be set before nnU-Net's __init__"
    assert trainer._do_i_compile() is False  # nnU-Net's default would compile
    torch.use_deterministic_algorithms(False)
    trainer.on_train_start()
    try:
        nondeterministic_op()
        record = trainer.varaug_record()["determinism"]
    finally:
        trainer.on_train_end()
    assert record["deterministic_algorithms"] and record["warn_only"] and record["cudnn_deterministic"]
    assert not record["cudnn_benchmark"] and record["compile"] is False and record["compile_requested"] is False
    assert record["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_CONFIG and record["cublas_config_set_by"] == "nnunet_varaug"
    assert record["device"] == "cpu" and len(record["nondeterministic_ops"]) == 1
    with open(tmp_path / "debug.json") as f:  # rewritten at the end of training, with the warnings
        assert json.load(f)["nnunet_varaug"]["determinism"] == record
    assert record["platform"] == platform_record(torch.device("cpu")), "the machine is recorded at train start"


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse4_2 avx avx2 fma

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu sse avx512f avx2
"""


def test_platform_record_names_the_cpu_its_vector_extension_and_the_software(tmp_path):
    from importlib.metadata import version

    import numpy as np

    (tmp_path / "cpuinfo").write_text(CPUINFO)
    record = platform_record(torch.device("cpu"), str(tmp_path / "cpuinfo"))
    assert record["cpu"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" and record["simd"] == "avx2"  # core 0
    assert record["torch"] == torch.__version__ and record["numpy"] == np.__version__
    assert record["nnunetv2"] == version("nnunetv2") and record["torch_threads"] == torch.get_num_threads()
    assert record["gpu"] is None and record["cuda"] is None  # a CPU replica
    missing = platform_record(torch.device("cpu"), str(tmp_path / "absent"))
    assert missing["cpu"] and missing["simd"] is None  # no /proc/cpuinfo (macOS): platform's names


def test_an_explicit_nnunet_compile_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_compile", "t")
    trainer = seed_trainer(tmp_path)
    assert trainer._do_i_compile() is True  # nnU-Net's own decision, here FakeTrainer's
    assert trainer.varaug_record()["determinism"]["compile"] is True


def _blurs(transform) -> list:
    """Every GaussianBlurTransform in a batchgeneratorsv2 transform tree (Compose / RandomTransform)."""
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    if isinstance(transform, GaussianBlurTransform):
        return [transform]
    children = list(getattr(transform, "transforms", []) or []) + [getattr(transform, "transform", None)]
    return [b for c in children if c is not None for b in _blurs(c)]


def _nnunet_training_transforms():
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.get_training_transforms(
        np.array([32, 32, 32]), ((-0.5, 0.5),) * 3, None, (0, 1, 2), do_dummy_2d_data_aug=False)


def test_a_seed_replicas_gaussian_blur_is_not_chosen_by_timing():
    """nnU-Net builds its blur with benchmark=True (direct or FFT convolution, whichever was faster the first time:
    the two differ in the last bits, so a resumed replica's weights did); a seed replica's dataloaders are built with
    benchmark=False, and nnU-Net's own setting is back afterwards."""
    class Base:
        def get_dataloaders(self):
            return _nnunet_training_transforms()

    class Replica(SeedReplicaMixin, Base):
        pass

    replica = object.__new__(Replica)  # get_dataloaders needs no more than these two attributes
    replica.replica_seed, replica.current_epoch = 0, 1
    blurs = _blurs(replica.get_dataloaders())
    assert blurs and all(b.benchmark is False for b in blurs)
    assert all(b.benchmark is True for b in _blurs(_nnunet_training_transforms())), "nnU-Net's default restored"


FORKED_WORKERS = '''
import torch
torch.set_num_threads(2)  # what nnUNetv2_train -device cpu does: one torch thread per core
x = torch.randn(1, 2, 40, 40, 40)
for _ in range(3):
    torch.nn.functional.conv3d(x, torch.randn(4, 2, 3, 3, 3))  # the OpenMP pool is up before the workers fork
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from nnunet_varaug.training.seeding import seeded_augmenters
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

class Loader(SlimDataLoaderBase):
    def __init__(self):
        super().__init__(None, 1, None)

    def generate_train_batch(self):
        return {"data": torch.randn(1, 2, 40, 40, 40)}

def blur(**batch):
    batch["data"] = torch.nn.functional.conv3d(batch["data"], torch.ones(4, 2, 3, 3, 3))
    return batch

with seeded_augmenters(1):
    augmenter = trainer_module.NonDetMultiThreadedAugmenter(Loader(), blur, 2, num_cached=4)
for _ in range(6):
    next(augmenter)
print("batches", flush=True)
for worker in augmenter._processes:  # they hold this script's stdout: end them, or the test waits for them
    worker.kill()
'''


def test_augmentation_workers_forked_from_a_multithreaded_torch_do_not_hang(tmp_path):
    """A seed replica's 2 augmentation workers are forked from nnUNetv2_train, whose torch runs one thread per core;
    a worker's torch op on the inherited OpenMP pool waited forever (CI's 2-worker training hit its 2400 s limit).
    The workers run torch single-threaded, as nnU-Net's own augmenter's do."""
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(FORKED_WORKERS)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="2")
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked augmentation workers hung (torch's OpenMP pool used after fork)")
    assert proc.returncode == 0 and "batches" in proc.stdout, proc.stderr[-3000:]
