"""Numerical replicas ``<Base>_mca<K>[_t<T>]``: class settings, the precision check, and two replicas trained end to
end through ``nnunet_varaug replicas --kind mca`` (which runs ``nnUNetv2_train … -tr nnUNetTrainerTiny_mca<K>``)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nnunet_varaug import registry
from nnunet_varaug.numerics import PrecisionError
from nnunet_varaug.trainers.mca import MCAReplicaMixin
from nnunet_varaug.trainers.replica import SeedReplicaMixin

from conftest import SYNTHETIC_3D_ID, TINY, run_cli


def test_class_settings():
    cls = registry.resolve(f"{TINY}_mca3_t16")
    assert issubclass(cls, MCAReplicaMixin) and issubclass(cls, SeedReplicaMixin)
    assert (cls.mca_stream, cls.mca_virtual_bits, cls.replica_seed) == (3, 16, 0)
    default = registry.resolve(f"{TINY}_mca0")
    assert (default.mca_stream, default.mca_virtual_bits, default.replica_seed) == (0, None, 0)
    assert not default._do_i_compile(object.__new__(default))


def test_virtual_bits_above_float32_refused():
    """nnU-Net trains in float32: t = 30 is refused before anything is built, naming the fix."""
    cls = registry.resolve(f"{TINY}_mca1_t30")
    with pytest.raises(PrecisionError, match=r"t=30 exceeds the 24 bits of float32.*_mca1_t16"):
        cls({}, "3d_fullres", 0, {}, torch.device("cpu"))


def test_training_step_autocast_is_off_only_inside():
    """nnU-Net's train_step enters autocast itself; under the mixin it gets a disabled one, restored after."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from nnunet_varaug.trainers.mca import _autocast_off

    original = trainer_module.autocast
    with _autocast_off():
        ctx = trainer_module.autocast("cpu", enabled=True)
        with ctx:
            assert not torch.is_autocast_enabled("cpu")
    assert trainer_module.autocast is original


def _weights(folder: str) -> torch.Tensor:
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return torch.cat([v.flatten().double() for v in ckpt["network_weights"].values()
                      if torch.is_floating_point(v)]), ckpt


@pytest.mark.e2e
def test_two_mca_replicas_end_to_end(synthetic_3d):
    """`replicas --kind mca -n 2` trains _mca0 and _mca1 with nnUNetv2_train; same RNG, different noise streams:
    they end with different weights, record kind, stream and t, and validate unperturbed like nnU-Net."""
    env = {**os.environ, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "3"}  # 3 steps are enough to differ
    proc = run_cli("nnunet_varaug", "replicas", "--kind", "mca", "-n", "2", "-tr", TINY, "-device", "cpu",
                   "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", env=env)
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
        w, ckpt = _weights(folder)
        stored = ckpt["nnunet_varaug"]["numerics"]
        assert stored["stream"] == k and stored["perturbed_ops"] > 0  # the training steps ran perturbed
        assert os.path.isfile(os.path.join(folder, "validation", "summary.json"))
        weights.append(w)
    assert not torch.equal(weights[0], weights[1])
    relative = ((weights[0] - weights[1]).norm() / weights[0].norm()).item()
    assert 0 < relative < 0.5  # the same training, apart from floating-point noise


def test_samples_and_analyze_accept_mca_replicas(seed_replicas, tmp_path):
    """`samples --kind mca` stores the numerical replicas' maps; `analyze --kind seed mca` reports both kinds side
    by side, with one row per kind and structure and their comparison."""
    import shutil

    import pandas as pd

    env = {**os.environ, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "3"}
    flags = ("-n", "2", "-tr", TINY, "-device", "cpu", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0")
    run_cli("nnunet_varaug", "replicas", "--kind", "mca", *flags, env=env)  # skipped when already trained

    samples = os.path.join(os.environ["nnUNet_preprocessed"], seed_replicas["name"], "varaug",
                           "nnUNetPlans__3d_fullres__fold_0")
    kept = str(tmp_path / "seed_samples")
    if os.path.isdir(samples):  # the seed sample set other tests use: set it aside, put it back afterwards
        shutil.move(samples, kept)
    try:
        run_cli("nnunet_varaug", "samples", "--kind", "mca", "--no-tta", *flags)
        with open(os.path.join(samples, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["kind"] == "mca" and manifest["num_replicas"] == 2
        assert [r["name"] for r in manifest["replicas"]] == [f"{TINY}_mca0", f"{TINY}_mca1"]
    finally:
        shutil.rmtree(samples, ignore_errors=True)
        if os.path.isdir(kept):
            shutil.move(kept, samples)

    out = str(tmp_path / "both_kinds")
    run_cli("nnunet_varaug", "analyze", "--kind", "seed", "mca", "--quiet", "-o", out, *flags)
    summary = pd.read_csv(os.path.join(out, "summary.csv"))
    assert sorted(summary["kind"].unique()) == ["mca", "seed"]
    assert len(summary) == 2 * 2  # two kinds x two structures (organ, lesion)
    assert os.path.isfile(os.path.join(out, "comparison.csv"))
    cases = pd.read_csv(os.path.join(out, "cases.csv"))
    assert set(cases["replica"]) == {f"{TINY}_seed0", f"{TINY}_seed1", f"{TINY}_mca0", f"{TINY}_mca1"}
