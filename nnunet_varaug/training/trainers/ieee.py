"""``<Base>_ieee``: the IEEE twin of the numerical replicas ``<Base>_mca<K>``.

It trains exactly like ``<Base>_mca<K>`` (seed of ``_seed0``, float32 training step with autocast, gradient
scaler, TF32 and ``torch.compile`` off, the same batches and augmentations; :class:`Float32TrainingMixin`)
with round-to-nearest arithmetic and no noise: the paper's "IEEE" reference model.
"""
from __future__ import annotations

from typing import Any, Dict

from nnunet_varaug.training.trainers.mca import TRAINING_DTYPE, Float32TrainingMixin


class IEEEReplicaMixin(Float32TrainingMixin):
    """``_mca``'s training path without its noise."""

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": 0}

    def varaug_record(self) -> Dict[str, Any]:
        record = super().varaug_record()
        record["numerics"] = {"kind": "ieee", "method": "IEEE-754 round to nearest (no noise)",
                              "dtype": str(TRAINING_DTYPE).replace("torch.", ""), "replica_seed": self.replica_seed,
                              "twin_of": "_mca<K> (same seed, batches, augmentations and float32 path)"}
        return record
