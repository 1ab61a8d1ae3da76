"""The settings every derived trainer records (``training/trainers/common.py``): in the checkpoint, written once."""
from __future__ import annotations

import pytest
import torch

from nnunet_varaug.training.trainers.common import SETTINGS_KEY, RecordSettingsMixin

pytestmark = pytest.mark.unit


class _NnUNetLike:
    """What nnU-Net's save_checkpoint does: one ``torch.save`` of a dict holding ``network_weights``."""

    local_rank, disable_checkpointing = 0, False

    def save_checkpoint(self, filename: str) -> None:
        torch.save({"network_weights": {"w": torch.ones(2)}, "current_epoch": 3}, filename)


class _Recorded(RecordSettingsMixin, _NnUNetLike):
    varaug_settings = {"numerics": {"mode": "op"}}


def test_the_record_is_in_the_checkpoint_nnunet_writes_without_reading_it_back(tmp_path, monkeypatch):
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    path = str(tmp_path / "checkpoint_latest.pth")
    _Recorded().save_checkpoint(path)
    checkpoint = real_load(path, weights_only=False)
    assert checkpoint[SETTINGS_KEY] == {"trainer": "_Recorded", "base": None, "numerics": {"mode": "op"}}
    assert checkpoint["current_epoch"] == 3 and torch.equal(checkpoint["network_weights"]["w"], torch.ones(2))
    assert loads == [], "the checkpoint was read back and written twice"
    assert torch.save is not None and torch.save.__name__ == "save", "torch.save left patched"


def test_a_checkpoint_saved_some_other_way_still_gets_the_record(tmp_path):
    class FileObjectSaver(_NnUNetLike):
        def save_checkpoint(self, filename):  # a future nnU-Net writing through a file object
            with open(filename, "wb") as f:
                torch.save({"network_weights": {}}, f)

    class Other(RecordSettingsMixin, FileObjectSaver):
        varaug_settings = {}

    path = tmp_path / "c.pth"
    Other().save_checkpoint(str(path))
    assert torch.load(path, weights_only=False)[SETTINGS_KEY]["trainer"] == "Other"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"], "a temporary file left behind"
