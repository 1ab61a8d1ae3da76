"""``<Base>_mca<K>`` and ``<Base>_mca<K>_t<T>``: numerical replicas, trained under Monte Carlo Arithmetic.

Every random number generator of training is seeded exactly as for ``<Base>_seed0`` (``replica_seed = 0``), so
two ``_mca`` replicas see the same initial weights, batches and augmentations and differ only through the
floating-point noise of stream K: the paper's "numerical variability". The whole training step
(``train_step``: forward, loss, backward, gradient clipping, optimizer step) runs under
:class:`~nnunet_varaug.numerics.MonteCarloArithmetic`; validation, checkpoint export, the final validation and
inference are plain IEEE arithmetic, so a numerical replica predicts like any nnU-Net model.

Training runs in float32 on every device: nnU-Net's CUDA autocast would compute convolutions in float16, whose
11 bits would round away a 24-bit perturbation, so the mixin turns autocast and the gradient scaler off for
the training step (validation keeps nnU-Net's autocast). ``torch.compile`` is off too: a dispatch mode sees the
ops one at a time, which compiled graphs would hide.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

from nnunet_varaug.numerics import MonteCarloArithmetic, PrecisionError, check_virtual_bits
from nnunet_varaug.trainers.replica import SeedReplicaMixin

#: The dtype nnU-Net's training step computes in under this mixin (autocast off).
TRAINING_DTYPE = torch.float32


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """Make nnU-Net's ``train_step`` build ``autocast(..., enabled=False)`` while it runs.

    nnU-Net enters ``autocast(self.device.type, enabled=True)`` itself, so an outer context cannot turn it off;
    we swap the name it calls in its own module (as ``seeding`` swaps its augmenter), only for this step.
    """
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    original = trainer_module.autocast

    def disabled(device_type: str, *args: Any, **kwargs: Any):
        return original(device_type, enabled=False)

    trainer_module.autocast = disabled
    try:
        yield
    finally:
        trainer_module.autocast = original


class MCAReplicaMixin(SeedReplicaMixin):
    """Trains with the RNG of ``_seed0`` and MCA random rounding (stream ``mca_stream``, ``mca_virtual_bits``)
    on every floating-point result of the training step."""

    replica_seed: int = 0
    mca_stream: int = 0
    mca_virtual_bits: Optional[int] = None  # None: float32's own 24 bits

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": 0, "mca_stream": int(settings["stream"]),
                "mca_virtual_bits": settings.get("virtual_bits")}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        try:
            bits = check_virtual_bits(self.mca_virtual_bits, TRAINING_DTYPE)
        except PrecisionError as e:
            raise PrecisionError(f"{type(self).__name__}: {e}. nnU-Net trains in float32, so numerical replicas "
                                 f"take t <= 24 (e.g. {getattr(self, 'varaug_base_name', 'nnUNetTrainer')}"
                                 f"_mca{self.mca_stream} for t = 24, or _mca{self.mca_stream}_t16)") from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mca_effective_bits = bits
        self.mca = MonteCarloArithmetic(bits, stream=self.mca_stream)
        self.grad_scaler = None  # float32 training: nothing to scale

    def _do_i_compile(self) -> bool:
        return False

    def on_train_epoch_start(self):
        # Per-epoch noise seeds: a run resumed at epoch e draws the same noise as an uninterrupted one from e on.
        self.mca.reseed("epoch", self.current_epoch)
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        with _autocast_off(), self.mca:
            return super().train_step(batch)

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        record["numerics"] = {
            "kind": "mca", "method": "MCA random rounding of every floating-point aten result",
            "stream": self.mca_stream, "virtual_bits": self.mca_effective_bits,
            "dtype": str(TRAINING_DTYPE).replace("torch.", ""), "perturbed": "train_step (forward, loss, "
            "backward, optimizer step)", "unperturbed": "validation, export, inference",
            "replica_seed": self.replica_seed,
            # run-time evidence that training was perturbed (counted in this process, so from a resume on)
            "perturbed_ops": self.mca.perturbed_ops, "perturbed_values": self.mca.perturbed_elements,
        }
        return record
