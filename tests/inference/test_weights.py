"""Models' network weights for predict (nnunet_varaug.inference.ensemble.Weights): kept or not by the weights'
own size, never the checkpoint file's (which holds the optimizer state too), and read once per model."""
from __future__ import annotations

import os

import pytest

from nnunet_varaug.inference import ensemble

pytestmark = pytest.mark.unit


def checkpoints(tmp_path, count=3, padding=1 << 19):
    """``count`` checkpoints of a small network (4 x 3 x 3 x 3 x 8 + 8 parameters) whose optimizer state is padded
    with ``padding`` floats: files about 60 times larger than the weights they hold."""
    import torch

    paths = []
    for k in range(count):
        g = torch.Generator().manual_seed(k)
        weights = {"conv.weight": torch.randn(8, 4, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g)}
        path = str(tmp_path / f"model{k}.pth")
        torch.save({"network_weights": weights, "optimizer_state": {"pad": torch.zeros(padding)},
                    "trainer_name": "x"}, path)
        paths.append(path)
    return paths


WEIGHT_BYTES = (8 * 4 * 27 + 8) * 4


def test_weights_kept_by_their_own_size_and_each_read_once(tmp_path):
    import torch

    paths = checkpoints(tmp_path)
    assert sum(os.path.getsize(p) for p in paths) > 50 * 3 * WEIGHT_BYTES
    weights = ensemble.Weights(paths, budget_bytes=3 * WEIGHT_BYTES)
    assert weights.model_bytes == WEIGHT_BYTES and weights.resident
    for _case in range(4):  # case by case: every model on every case
        for k in range(3):
            w = weights[k]
            saved = torch.load(paths[k], weights_only=False)["network_weights"]
            assert set(w) == set(saved) and all(torch.equal(w[n], saved[n]) for n in saved)
    assert dict(weights.loads) == {p: 1 for p in paths}


def test_weights_over_the_budget_are_read_once_per_model_going_model_by_model(tmp_path):
    paths = checkpoints(tmp_path)
    weights = ensemble.Weights(paths, budget_bytes=3 * WEIGHT_BYTES - 1)
    assert not weights.resident
    for k in range(3):  # model by model over a batch of 4 cases
        for _case in range(4):
            weights[k]
    assert dict(weights.loads) == {p: 1 for p in paths}
    assert len(weights.cache) == 1  # only the model in use is held


def test_weights_already_read_by_nnunet_are_not_read_again(tmp_path):
    paths = checkpoints(tmp_path)
    first = ensemble.read_network_weights(paths[0])
    weights = ensemble.Weights(paths, budget_bytes=1 << 30, first=first)
    for k in range(3):
        weights[k]
    assert weights[0] is first and dict(weights.loads) == {paths[1]: 1, paths[2]: 1}
    assert "3 models" in weights.describe() and "kept in memory" in weights.describe()


def test_shared_tensors_count_once_and_stay_shared(tmp_path):
    """nnU-Net's decoder holds the encoder: its state dict names each encoder tensor twice, stored once."""
    import torch

    conv = torch.randn(8, 4, 3, 3, 3)
    path = str(tmp_path / "shared.pth")
    torch.save({"network_weights": {"encoder.w": conv, "decoder.encoder.w": conv, "bias": torch.zeros(8)},
                "optimizer_state": {}}, path)
    w = ensemble.read_network_weights(path)
    assert w["encoder.w"].untyped_storage().data_ptr() == w["decoder.encoder.w"].untyped_storage().data_ptr()
    assert ensemble.state_bytes(w) == conv.numel() * 4 + 8 * 4
