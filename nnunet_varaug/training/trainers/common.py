"""What every derived trainer shares: its settings recorded in ``debug.json`` and in each checkpoint."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnunet_varaug.utilities.fileio import temporary_name, write_json

SETTINGS_KEY = "nnunet_varaug"


class RecordSettingsMixin:
    """Adds ``nnunet_varaug`` (the class's ``varaug_settings`` plus run-time facts) to debug.json and checkpoints."""

    varaug_settings: Dict[str, Any] = {}

    def varaug_record(self) -> Dict[str, Any]:
        """The settings to record; subclasses extend it with run-time facts (e.g. a sample-set fingerprint)."""
        return {"trainer": type(self).__name__, "base": getattr(type(self), "varaug_base_name", None),
                **{k: dict(v) for k, v in self.varaug_settings.items()}}

    def _save_debug_information(self):
        super()._save_debug_information()
        self.varaug_update_debug_record()

    def varaug_update_debug_record(self) -> None:
        """Rewrite ``nnunet_varaug`` in debug.json with :meth:`varaug_record` as it is now (e.g. at the end of
        training, with facts learnt while training)."""
        path = join(self.output_folder, "debug.json")
        if self.local_rank == 0 and isfile(path):
            debug = load_json(path)
            debug[SETTINGS_KEY] = self.varaug_record()
            write_json(path, debug, indent=4)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with ``nnunet_varaug`` added as nnU-Net writes it (one write: the replicas
        checkpoint every epoch); read back and rewritten only if nnU-Net saved it some other way."""
        with _record_added(filename, self.varaug_record) as added:
            super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and isfile(filename) and not added:
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[SETTINGS_KEY] = self.varaug_record()
            tmp = temporary_name(filename)
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)


@contextmanager
def _record_added(filename: str, record: Callable[[], Dict[str, Any]]) -> Iterator[List[bool]]:
    """While open, ``torch.save`` of a checkpoint dict (``network_weights`` in it) to ``filename`` adds
    ``record()`` under :data:`SETTINGS_KEY`; the yielded list holds ``True`` once that happened."""
    original, added = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f) == os.fspath(filename) and isinstance(obj, dict) \
                and "network_weights" in obj:
            obj = {**obj, SETTINGS_KEY: record()}
            added.append(True)
        return original(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield added
    finally:
        torch.save = original
