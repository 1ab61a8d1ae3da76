"""``<Base>_seed<K>``: a seed replica, every random number generator of training derived from K, and the
GPU's kernels made deterministic (see :mod:`nnunet_varaug.training.seeding`). Its random numbers come from four
streams (:meth:`SeedReplicaMixin.stream_seed`), all K here; a one-source replica
(:mod:`nnunet_varaug.training.trainers.one_source`) changes one of them."""
# no "from __future__ import annotations": the constructor's signature stays nnUNetTrainer's, annotations included

from typing import Any, Dict, Tuple

import torch

from nnunet_varaug.training.seeding import (STREAM_LAYOUT, NondeterminismRecorder, compile_decision,
                                            configure_cublas, derive_seed, make_deterministic, platform_record,
                                            seed_everything, seeded_augmenters, untimed_gaussian_blur)
from nnunet_varaug.training.trainers.common import RecordSettingsMixin
from nnunet_varaug.training.preemption import PreemptibleTrainingMixin


# Preemption hook (issue 24, nnunet_varaug/training/preemption.py): a checkpoint after every epoch, a clean exit on
# SIGTERM/SIGUSR2, each epoch seeded from (replica_seed, epoch) so that --c ends as an uninterrupted run.
class SeedReplicaMixin(PreemptibleTrainingMixin, RecordSettingsMixin):
    """Seeds python, numpy, torch and CUDA from ``replica_seed`` before the network is built, draws each batch's
    cases and patch locations and its augmentation from two streams of their own (order-deterministic, with or
    without augmentation workers; the streams' indices recorded under ``streams``), and its Gaussian blur is never
    chosen by timing (:func:`~nnunet_varaug.training.seeding.untimed_gaussian_blur`). Arithmetic stays plain IEEE.
    For the GPU: deterministic algorithms (warn-only, the warnings recorded), cuDNN deterministic and benchmark off,
    ``CUBLAS_WORKSPACE_CONFIG`` set in ``__init__`` (before ``nnUNetv2_train`` initialises CUDA), ``torch.compile``
    off unless the user sets ``nnUNet_compile``. What was arranged is recorded under ``determinism`` in
    debug.json and in every checkpoint, with the machine and software the weights depend on (``platform``)."""

    replica_seed: int = 0
    #: The random streams of a training, for :meth:`stream_seed`: the network's initial weights, the batches' cases
    #: and patch locations (nnU-Net's sampling), their augmentation, and the rest of the run ("train": the training
    #: loop's own draws and the key of the augmenters' runs).
    STREAMS: Tuple[str, ...] = ("init", "order", "aug", "train")

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": settings["seed"]}

    def stream_seed(self, stream: str) -> int:
        """The index of ``stream`` (one of :attr:`STREAMS`): K for ``<Base>_seed<K>``. The hook a one-source
        replica overrides for its own stream; every other stream stays ``<Base>_seed0``'s."""
        if stream not in self.STREAMS:
            raise ValueError(f"unknown stream '{stream}': one of {', '.join(self.STREAMS)}")
        return self.replica_seed

    def configure_kernels(self) -> Dict[str, Any]:
        """Set torch's kernel choices at train start and return them for the record: deterministic here; the
        hook ``<Base>_nondet<K>`` overrides."""
        return make_deterministic()

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
        record["streams"] = {"layout": STREAM_LAYOUT, **{s: self.stream_seed(s) for s in self.STREAMS}}
        return record

    def initialize(self):
        seed_everything(derive_seed(self.stream_seed("init"), "network"))
        super().initialize()

    def on_train_start(self):
        self.varaug_determinism.update(self.configure_kernels())
        self.varaug_determinism["platform"] = platform_record(self.device)  # after nnUNetv2_train set the threads
        self.varaug_nondeterminism.install()
        # Each epoch is reseeded from (replica, epoch) by training/preemption.py; this seeds what runs before the first.
        seed_everything(derive_seed(self.stream_seed("train"), "train", self.current_epoch))
        super().on_train_start()

    def on_train_end(self):
        try:
            super().on_train_end()  # saves checkpoint_final.pth, with the warnings recorded so far
        finally:
            self.varaug_nondeterminism.uninstall()
            self.varaug_update_debug_record()

    def get_dataloaders(self):
        with seeded_augmenters(derive_seed(self.stream_seed("train"), "augmentation", self.current_epoch),
                               self.stream_seed("order"), self.stream_seed("aug")), untimed_gaussian_blur():
            return super().get_dataloaders()
