"""``<Base>_mca<K>[_t<T>][_instr]``: numerical replicas, and what they share with their IEEE twin ``<Base>_ieee``.

:class:`Float32TrainingMixin` is the training path common to ``_mca`` and ``_ieee``: every random number
generator seeded as for ``<Base>_seed0`` (``replica_seed = 0``: same initial weights, batches and
augmentations), the training step (``train_step``: forward, loss, backward, gradient clipping, optimizer step)
in float32 with autocast and the gradient scaler off, TF32 off (cuDNN and CUDA matmul), ``torch.compile`` off
(a dispatch mode sees the ops one at a time, which compiled graphs would hide), and every precision setting
recorded in debug.json and in each checkpoint. Validation, export and inference are nnU-Net's own.

:class:`MCAReplicaMixin` adds stochastic rounding of stream K
(:class:`~nnunet_varaug.training.numerics.MonteCarloArithmetic`, ``granularity="op"``, or ``"instruction"`` for
``_instr``) to the training step only, so ``_mca<K>`` and ``_ieee`` differ through that noise alone.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

from nnunet_varaug.training.numerics import MonteCarloArithmetic, PrecisionError, check_virtual_bits
from nnunet_varaug.training.numerics.precision import disable_tf32, precision_settings
from nnunet_varaug.training.trainers.replica import SeedReplicaMixin

#: The dtype nnU-Net's training step computes in under these mixins (autocast off).
TRAINING_DTYPE = torch.float32


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
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


class Float32TrainingMixin(SeedReplicaMixin):
    """The float32 training path of ``_mca`` and ``_ieee`` (module docstring); no noise by itself."""

    replica_seed: int = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        disable_tf32()
        self.grad_scaler = None  # float32 training: nothing to scale

    def _do_i_compile(self) -> bool:
        return False

    def on_train_start(self):
        disable_tf32()  # again: nothing between __init__ and training may turn it back on
        super().on_train_start()

    def training_context(self):
        """The context the training step runs in, inside autocast-off (the MCA mode for ``_mca``)."""
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> dict:
        with autocast_off(), self.training_context():
            return super().train_step(batch)

    def precision_record(self) -> Dict[str, Any]:
        return {"train_step_dtype": str(TRAINING_DTYPE).replace("torch.", ""), "train_step_autocast": False,
                "grad_scaler": self.grad_scaler is not None, "torch_compile": False,
                "validation_autocast": "nnU-Net's own (enabled on CUDA)", **precision_settings()}

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        record["precision"] = self.precision_record()
        return record


class MCAReplicaMixin(Float32TrainingMixin):
    """Trains with the RNG of ``_seed0`` and stochastic rounding (stream ``mca_stream``, ``mca_virtual_bits``,
    ``mca_granularity``) of every floating-point result of the training step."""

    mca_stream: int = 0
    mca_virtual_bits: Optional[int] = None  # None: float32's own 24 bits (stochastic rounding)
    mca_granularity: str = "op"

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": 0, "mca_stream": int(settings["stream"]),
                "mca_virtual_bits": settings.get("virtual_bits"),
                "mca_granularity": settings.get("granularity", "op")}

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
        self.mca = MonteCarloArithmetic(None if bits == 24 else bits, stream=self.mca_stream,
                                        granularity=self.mca_granularity)

    def on_train_epoch_start(self):
        # Per-epoch noise seeds: a run resumed at epoch e draws the same noise as an uninterrupted one from e on.
        self.mca.reseed(self.current_epoch)
        super().on_train_epoch_start()

    def training_context(self):
        return self.mca

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        sr = self.mca_effective_bits == 24
        record["numerics"] = {
            "kind": "mca", "granularity": self.mca_granularity,
            "method": ("stochastic rounding" if sr else
                       f"Verificarlo's random rounding (rr) at t={self.mca_effective_bits}")
            + (" of each rounded aten op's float32 results, computed in float64" if self.mca_granularity == "op" else
               " of every product and addition of the step's reductions (convolutions, matrix products, sums, "
               "normalisation, softmax, NLL, norms) and of every other rounded aten result"),
            "stream": self.mca_stream, "virtual_bits": self.mca_effective_bits,
            "dtype": str(TRAINING_DTYPE).replace("torch.", ""), "perturbed": "train_step (forward, loss, "
            "backward, optimizer step)", "unperturbed": "validation, export, inference",
            "replica_seed": self.replica_seed, "generator": self.mca.generator,
            # run-time evidence that training was perturbed (counted in this process, so from a resume on)
            "perturbed_ops": self.mca.perturbed_ops, "perturbed_values": self.mca.perturbed_elements,
        }
        return record
