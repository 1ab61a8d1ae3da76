"""What every derived trainer shares: its settings recorded in ``debug.json`` and in each checkpoint."""
from __future__ import annotations

import os
from typing import Any, Dict

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
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and isfile(filename):
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[SETTINGS_KEY] = self.varaug_record()
            tmp = temporary_name(filename)
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)
