"""``<Base>_seed<K>``: a seed replica, every random number generator of training derived from K, and the
GPU's kernels made deterministic (see :mod:`nnunet_varaug.training.seeding`)."""
# no "from __future__ import annotations": the constructor's signature stays nnUNetTrainer's, annotations included

from typing import Any, Dict

import torch

from nnunet_varaug.training.seeding import (NondeterminismRecorder, compile_decision, configure_cublas, derive_seed,
                                   make_deterministic, platform_record, seed_everything, seeded_augmenters,
                                   untimed_gaussian_blur)
from nnunet_varaug.training.trainers.common import RecordSettingsMixin


class SeedReplicaMixin(RecordSettingsMixin):
    """Seeds python, numpy, torch and CUDA from ``replica_seed`` before the network is built, and gives the
    augmentation workers seeds derived from it (order-deterministic), and its Gaussian blur is never chosen by
    timing (:func:`~nnunet_varaug.training.seeding.untimed_gaussian_blur`). Arithmetic stays plain IEEE. For the GPU:
    deterministic algorithms (warn-only, the warnings recorded), cuDNN deterministic and benchmark off,
    ``CUBLAS_WORKSPACE_CONFIG`` set in ``__init__`` (before ``nnUNetv2_train`` initialises CUDA), ``torch.compile``
    off unless the user sets ``nnUNet_compile``. What was arranged is recorded under ``determinism`` in
    debug.json and in every checkpoint, with the machine and software the weights depend on (``platform``)."""

    replica_seed: int = 0

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": settings["seed"]}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        cublas = configure_cublas()  # first: before anything in this process can create a cuBLAS handle
        super().__init__(plans, configuration, fold, dataset_json, device)
        compile_on, reason = compile_decision()
        self.varaug_determinism: Dict[str, Any] = {
            "device": self.device.type, "CUBLAS_WORKSPACE_CONFIG": cublas["CUBLAS_WORKSPACE_CONFIG"],
            "cublas_config_set_by": cublas["set_by"],
            "cuda_initialized_before_cublas_config": cublas["cuda_initialized"],
            "compile_requested": compile_on, "compile_reason": reason, "compile": None,
            "nondeterministic_ops": []}
        self.varaug_nondeterminism = NondeterminismRecorder()

    def _do_i_compile(self) -> bool:
        compile_on, _ = compile_decision()
        decided = super()._do_i_compile() if compile_on is None else compile_on
        if hasattr(self, "varaug_determinism"):
            self.varaug_determinism["compile"] = bool(decided)
        return decided

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        if hasattr(self, "varaug_determinism"):
            self.varaug_determinism["nondeterministic_ops"] = list(self.varaug_nondeterminism.messages)
            record["determinism"] = dict(self.varaug_determinism)
        return record

    def initialize(self):
        seed_everything(derive_seed(self.replica_seed, "network"))
        super().initialize()

    def on_train_start(self):
        self.varaug_determinism.update(make_deterministic())
        self.varaug_determinism["platform"] = platform_record(self.device)  # after nnUNetv2_train set the threads
        self.varaug_nondeterminism.install()
        # Seeded per start epoch: a fresh run and a run resumed at epoch e are each reproducible.
        seed_everything(derive_seed(self.replica_seed, "train", self.current_epoch))
        super().on_train_start()

    def on_train_end(self):
        try:
            super().on_train_end()  # saves checkpoint_final.pth, with the warnings recorded so far
        finally:
            self.varaug_nondeterminism.uninstall()
            self.varaug_update_debug_record()

    def get_dataloaders(self):
        with seeded_augmenters(derive_seed(self.replica_seed, "augmentation", self.current_epoch)), \
                untimed_gaussian_blur():
            return super().get_dataloaders()
