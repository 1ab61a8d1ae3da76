"""The mean probabilities kept for majority-vote ties (probsums.py) and analyze's choice of the IEEE reference."""
from __future__ import annotations

import os

import numpy as np
import pytest

from nnunet_varaug.inference import probsums

pytestmark = pytest.mark.unit


def test_mean_is_stored_and_tied_to_the_replicas_checkpoints(tmp_path):
    out = str(tmp_path)
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(3), size=(4, 5)).transpose(2, 0, 1).astype(np.float32) for _ in range(3)]
    shas = {"r0": "a", "r1": "b", "r2": "c"}
    assert not probsums.is_current(out, "seed", "case1", shas) and probsums.load(out, "seed", "case1") is None
    probsums.save(out, "seed", "case1", probs[0] + probs[1] + probs[2], shas)
    np.testing.assert_allclose(probsums.load(out, "seed", "case1"), np.mean(probs, axis=0), rtol=1e-6)
    assert probsums.is_current(out, "seed", "case1", shas)
    assert not probsums.is_current(out, "seed", "case1", {**shas, "r1": "retrained"})
    assert not probsums.is_current(out, "seed", "case1", {"r0": "a", "r1": "b"})  # another K
    assert not probsums.is_current(out, "mca", "case1", shas)  # per kind
    assert not [f for f in os.listdir(probsums.folder(out, "seed")) if f.startswith(".")]  # no temporary left


def test_analyze_uses_the_ieee_model_when_its_checkpoint_exists(tmp_path, monkeypatch, capsys):
    from nnunet_varaug.inference.cache import reference_model
    from nnunet_varaug.training.experiment import Experiment

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    exp = Experiment("Dataset999_Fake", "3d_fullres", 0, 3, "nnUNetTrainerTiny", "mca")
    assert reference_model(exp, ["mca"]) is None
    err = capsys.readouterr().err
    assert "no nnUNetTrainerTiny_ieee model" in err and "-tr nnUNetTrainerTiny_ieee" in err
    assert reference_model(exp, ["seed"]) is None and capsys.readouterr().err == ""
    path = exp.final_checkpoint("nnUNetTrainerTiny_ieee")
    os.makedirs(os.path.dirname(path))
    assert reference_model(exp, ["seed"]) is None  # folder without a final checkpoint: training unfinished
    open(path, "wb").close()
    assert reference_model(exp, ["seed"]) == "nnUNetTrainerTiny_ieee"
