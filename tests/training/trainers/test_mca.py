"""Numerical replicas ``<Base>_mca<K>[_t<T>][_instr]`` and their IEEE twin ``<Base>_ieee``: class settings, the
precision checks and settings, and trainings (in process for two steps, and end to end through
``nnunet_varaug replicas --kind mca``, which runs ``nnUNetv2_train … -tr nnUNetTrainerTiny_mca<K>``)."""
from __future__ import annotations

import json
import os

import numpy as np

import pytest
import torch

from nnunet_varaug.utilities import names

from nnunet_varaug.training import registry
from nnunet_varaug.training.numerics import PrecisionError
from nnunet_varaug.training.trainers.ieee import IEEEReplicaMixin
from nnunet_varaug.training.trainers.mca import Float32TrainingMixin, MCAReplicaMixin
from nnunet_varaug.training.trainers.replica import SeedReplicaMixin

from conftest import SYNTHETIC_3D_ID, TINY, run_cli, side_by_side_env, trainer_in_process


@pytest.mark.unit
def test_class_settings():
    cls = registry.resolve(f"{TINY}_mca3_t16")
    assert issubclass(cls, MCAReplicaMixin) and issubclass(cls, SeedReplicaMixin)
    assert (cls.mca_stream, cls.mca_virtual_bits, cls.replica_seed) == (3, 16, 0)
    default = registry.resolve(f"{TINY}_mca0")
    assert (default.mca_stream, default.mca_virtual_bits, default.replica_seed) == (0, None, 0)
    assert not default._do_i_compile(object.__new__(default))
    assert default.mca_granularity == "op"
    instr = registry.resolve(f"{TINY}_mca2_t20_instr")
    assert (instr.mca_stream, instr.mca_virtual_bits, instr.mca_granularity) == (2, 20, "instruction")
    ieee = registry.resolve(f"{TINY}_ieee")
    assert issubclass(ieee, IEEEReplicaMixin) and issubclass(ieee, Float32TrainingMixin)
    assert not issubclass(ieee, MCAReplicaMixin) and ieee.replica_seed == 0


class _FakeBase:
    """Stands in for nnUNetTrainer: the mixins' __init__ runs without plans or data."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        self.grad_scaler = object()
        self.device = device


@pytest.mark.unit
@pytest.mark.parametrize("mixin", [IEEEReplicaMixin, MCAReplicaMixin])
def test_tf32_off_and_every_precision_setting_recorded(mixin):
    """Building an _mca or _ieee trainer turns TF32 off for cuDNN and CUDA matmul (set on beforehand) and drops
    the gradient scaler; the record reads the flags back from torch itself."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    try:
        cls = type("T", (mixin, _FakeBase), {"varaug_settings": {}})
        trainer = cls({}, "3d_fullres", 0, {}, torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert trainer.grad_scaler is None
        record = trainer.precision_record()
        assert record["cuda_matmul_allow_tf32"] is False and record["cudnn_allow_tf32"] is False
        assert record["float32_matmul_precision"] == torch.get_float32_matmul_precision() == "highest"
        assert record["train_step_dtype"] == "float32" and record["train_step_autocast"] is False
        assert record["cudnn_deterministic"] == torch.backends.cudnn.deterministic
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous[:2]
        torch.set_float32_matmul_precision(previous[2])


@pytest.mark.unit
def test_replica_name_helper():
    """replica_name builds every replica name of the grammar and refuses what the grammar does not take."""
    assert names.replica_name("nnUNetTrainer", "ieee") == "nnUNetTrainer_ieee"
    assert names.replica_name("nnUNetTrainer", "mca", 3) == "nnUNetTrainer_mca3"
    assert names.replica_name("B", "mca", 1, virtual_bits=16, granularity="instruction") == "B_mca1_t16_instr"
    assert names.replica_name("B", "seed", 2) == "B_seed2"
    with pytest.raises(ValueError, match="apply to 'mca'"):
        names.replica_name("B", "ieee", granularity="instruction")
    with pytest.raises(names.TrainerNameError, match="1..24"):
        names.replica_name("B", "mca", 0, virtual_bits=30)


@pytest.mark.unit
def test_virtual_bits_above_float32_refused():
    """nnU-Net trains in float32: t = 30 is refused before anything is built, naming the fix."""
    with pytest.raises(names.TrainerNameError, match=r"t=30 is outside 1..24"):
        registry.resolve(f"{TINY}_mca1_t30")
    cls = type("T", (MCAReplicaMixin, _FakeBase), {"mca_virtual_bits": 25, "mca_stream": 1, "varaug_settings": {}})
    with pytest.raises(PrecisionError, match=r"t=25 exceeds the 24 bits of float32.*_mca1_t16"):
        cls({}, "3d_fullres", 0, {}, torch.device("cpu"))


@pytest.mark.unit
def test_training_step_autocast_is_off_only_inside():
    """nnU-Net's train_step enters autocast itself; under the mixin it gets a disabled one, restored after."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from nnunet_varaug.training.trainers.mca import autocast_off

    original = trainer_module.autocast
    with autocast_off():
        ctx = trainer_module.autocast("cpu", enabled=True)
        with ctx:
            assert not torch.is_autocast_enabled("cpu")
    assert trainer_module.autocast is original


def _weights(folder: str) -> torch.Tensor:
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return torch.cat([v.flatten().double() for v in ckpt["network_weights"].values()
                      if torch.is_floating_point(v)]), ckpt


def _two_steps(name: str, dataset: str):
    """Build trainer ``name`` on fold 1 (no other test trains fold 1), run nnU-Net's on_train_start and two of
    its training steps on its own loader's batches; return (initial weights, batches, weights after, trainer)."""
    trainer = trainer_in_process(name, dataset, 1)
    trainer.initialize()
    flat = lambda: torch.cat([p.detach().flatten().clone() for p in trainer.network.parameters()])  # noqa: E731
    initial = flat()
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    trainer.network.train()
    batches = []
    for _ in range(2):
        batch = next(trainer.dataloader_train)
        batches.append(batch["data"].clone())
        trainer.train_step(batch)
    return initial, batches, flat(), trainer


@pytest.mark.e2e
def test_mca0_and_ieee_are_reproducible_twins(synthetic_3d):
    """Two training steps in process: _mca0 twice is bitwise identical and so is _ieee; _mca0 and _ieee start
    from identical weights and see identical batches, and end different (by rounding-sized amounts); the
    validation step runs unperturbed: the _mca0 trainer's validation equals the _ieee trainer's on the same
    weights, and the noise counter does not move."""
    mca_a = _two_steps(f"{TINY}_mca0", synthetic_3d["name"])
    mca_b = _two_steps(f"{TINY}_mca0", synthetic_3d["name"])
    ieee_a = _two_steps(f"{TINY}_ieee", synthetic_3d["name"])
    ieee_b = _two_steps(f"{TINY}_ieee", synthetic_3d["name"])
    assert torch.equal(mca_a[2], mca_b[2]) and torch.equal(ieee_a[2], ieee_b[2])
    assert torch.equal(mca_a[0], ieee_a[0])
    assert all(torch.equal(x, y) for x, y in zip(mca_a[1], ieee_a[1]))
    assert not torch.equal(mca_a[2], ieee_a[2])
    step = (ieee_a[2] - ieee_a[0]).norm()
    assert 0 < (mca_a[2] - ieee_a[2]).norm() < 0.01 * step  # noise, not a different training
    assert mca_a[3].mca.perturbed_ops > 0
    mca_trainer, ieee_trainer = mca_a[3], ieee_a[3]
    ieee_trainer.network.load_state_dict(mca_trainer.network.state_dict())
    batch = next(mca_trainer.dataloader_val)
    before = mca_trainer.mca.perturbed_ops
    got = mca_trainer.validation_step({k: v for k, v in batch.items()})
    want = ieee_trainer.validation_step({k: v for k, v in batch.items()})
    assert mca_trainer.mca.perturbed_ops == before
    for key in ("loss", "tp_hard", "fp_hard", "fn_hard"):
        assert np.array_equal(np.asarray(got[key]), np.asarray(want[key]))


@pytest.mark.e2e
def test_two_mca_replicas_end_to_end(synthetic_3d):
    """`replicas --kind mca -n 2` trains _mca0 and _mca1 with nnUNetv2_train; same RNG, different noise streams:
    they end with different weights, record kind, stream and t, and validate unperturbed like nnU-Net."""
    env = {**os.environ, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "3"}  # 3 steps are enough to differ
    proc = run_cli("nnunet_varaug", "replicas", "--kind", "mca", "-n", "2", "-tr", TINY, "-device", "cpu",
                   "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "--devices", "0,1",
                   env=side_by_side_env(env))  # the two side by side
    results = os.path.join(os.environ["nnUNet_results"], synthetic_3d["name"])
    weights = []
    for k in (0, 1):
        name = f"{TINY}_mca{k}"
        assert name in proc.stdout
        folder = os.path.join(results, f"{name}__nnUNetPlans__3d_fullres", "fold_0")
        with open(os.path.join(folder, "debug.json")) as f:
            record = json.load(f)["nnunet_varaug"]
        assert record["mca"] == {"stream": k, "virtual_bits": None}
        assert record["numerics"]["kind"] == "mca" and record["numerics"]["stream"] == k
        assert record["numerics"]["virtual_bits"] == 24 and record["numerics"]["replica_seed"] == 0
        assert record["numerics"]["granularity"] == "op" and record["precision"]["cudnn_allow_tf32"] is False
        assert record["numerics"]["generator"]["name"] == "philox4x32-10"
        w, ckpt = _weights(folder)
        stored = ckpt["nnunet_varaug"]["numerics"]
        assert stored["stream"] == k and stored["perturbed_ops"] > 0  # the training steps ran perturbed
        assert ckpt["nnunet_varaug"]["precision"]["cuda_matmul_allow_tf32"] is False
        assert os.path.isfile(os.path.join(folder, "validation", "summary.json"))
        weights.append(w)
    assert not torch.equal(weights[0], weights[1])
    relative = ((weights[0] - weights[1]).norm() / weights[0].norm()).item()
    assert 0 < relative < 0.5  # the same training, apart from floating-point noise


@pytest.mark.e2e
def test_samples_and_analyze_accept_mca_replicas(seed_replicas, tmp_path):
    """`samples --kind mca` stores the numerical replicas' maps; `analyze --kind seed mca` reports both kinds side
    by side, with one row per kind and structure and their comparison. Self-contained: it trains (or reuses) the
    mca replicas itself and writes its sample set under a private nnUNet_preprocessed whose dataset folder links
    to the shared one's files, so no other test's sample set is touched."""
    import pandas as pd

    env = {**os.environ, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "3"}
    flags = ("-n", "2", "-tr", TINY, "-device", "cpu", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0")
    # skipped when already trained (by test_two_mca_replicas_end_to_end); else the two side by side
    run_cli("nnunet_varaug", "replicas", "--kind", "mca", *flags, "--devices", "0,1", env=side_by_side_env(env))

    shared = os.path.join(os.environ["nnUNet_preprocessed"], seed_replicas["name"])
    private = tmp_path / "preprocessed"
    (private / seed_replicas["name"]).mkdir(parents=True)
    for entry in os.listdir(shared):
        if entry != "varaug":
            os.symlink(os.path.join(shared, entry), private / seed_replicas["name"] / entry)
    samples = os.path.join(private, seed_replicas["name"], "varaug", "nnUNetPlans__3d_fullres__fold_0")
    run_cli("nnunet_varaug", "samples", "--kind", "mca", "--no-tta", *flags,
            env={**env, "nnUNet_preprocessed": str(private)})
    with open(os.path.join(samples, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["kind"] == "mca" and manifest["num_replicas"] == 2
    assert [r["name"] for r in manifest["replicas"]] == [f"{TINY}_mca0", f"{TINY}_mca1"]

    out = str(tmp_path / "both_kinds")
    run_cli("nnunet_varaug", "analyze", "--kind", "seed", "mca", "--quiet", "-o", out, *flags)
    summary = pd.read_csv(os.path.join(out, "summary.csv"))
    assert sorted(summary["kind"].unique()) == ["mca", "seed"]
    assert len(summary) == 2 * 2  # two kinds x two structures (organ, lesion)
    assert os.path.isfile(os.path.join(out, "comparison.csv"))
    cases = pd.read_csv(os.path.join(out, "cases.csv"))
    assert set(cases["replica"]) == {f"{TINY}_seed0", f"{TINY}_seed1", f"{TINY}_mca0", f"{TINY}_mca1"}
