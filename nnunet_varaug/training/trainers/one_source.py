"""One-source replicas: ``<Base>_seed0`` with one source of randomness changed, each by one small mixin.

A seed replica draws four streams from K (:meth:`~nnunet_varaug.training.trainers.replica.SeedReplicaMixin.
stream_seed`): the network's initial weights (``init``), which cases and patch locations each batch holds
(``order``: nnU-Net's sampling, foreground oversampling included), the augmentation parameters (``aug``), and the
rest of the run (``train``). Each mixin here keeps every stream at ``<Base>_seed0``'s and overrides one hook:

==========================  ===============================================================  ===================
name                        what differs from ``<Base>_seed0``                                hook
==========================  ===============================================================  ===================
``<Base>_init<K>``          the initial weights, from stream K                                ``stream_seed``
``<Base>_order<K>``         the batches' cases and patch locations, from stream K             ``stream_seed``
``<Base>_aug<K>``           the augmentation parameters, from stream K                        ``stream_seed``
``<Base>_nondet<K>``        non-deterministic GPU kernels (K labels the run; GPU only)        ``configure_kernels``
==========================  ===============================================================  ===================

K = 0 of ``_init``, ``_order`` and ``_aug`` is bitwise ``<Base>_seed0``. The sampling and augmentation streams are
kept apart inside nnU-Net's data loader (:class:`~nnunet_varaug.training.seeding.SeededWorkerLoader`), with or
without augmentation workers. (``<Base>_mca<K>``, the rounding noise, is :mod:`.mca`.)
"""
# no "from __future__ import annotations": the constructor's signature stays nnUNetTrainer's, annotations included

from typing import Any, Dict

import torch

from nnunet_varaug.training.seeding import allow_nondeterminism
from nnunet_varaug.training.trainers.replica import SeedReplicaMixin
from nnunet_varaug.utilities.errors import VarAugError


class _OneStreamMixin(SeedReplicaMixin):
    """``<Base>_seed0`` with stream ``source`` drawn from ``source_stream``."""

    source: str = ""
    source_stream: int = 0

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": 0, "source_stream": int(settings["stream"])}


class InitReplicaMixin(_OneStreamMixin):
    """``<Base>_init<K>``: the network's initial weights from stream K."""

    source = "init"

    def stream_seed(self, stream: str) -> int:
        return self.source_stream if stream == "init" else super().stream_seed(stream)


class OrderReplicaMixin(_OneStreamMixin):
    """``<Base>_order<K>``: which cases and patch locations each batch holds, from stream K."""

    source = "order"

    def stream_seed(self, stream: str) -> int:
        return self.source_stream if stream == "order" else super().stream_seed(stream)


class AugReplicaMixin(_OneStreamMixin):
    """``<Base>_aug<K>``: the augmentation parameters from stream K."""

    source = "aug"

    def stream_seed(self, stream: str) -> int:
        return self.source_stream if stream == "aug" else super().stream_seed(stream)


class NondetReplicaMixin(SeedReplicaMixin):
    """``<Base>_nondet<K>``: ``<Base>_seed0`` with deterministic algorithms off and cuDNN benchmarking on (the
    kernels nnU-Net itself lets the GPU choose); K only labels the run. Refused on the CPU, where PyTorch's kernels
    are deterministic and the run would be ``<Base>_seed0`` again."""

    source = "nondet"
    nondet_run: int = 0

    @staticmethod
    def class_attributes(settings: dict) -> dict:
        return {"replica_seed": 0, "nondet_run": int(settings["run"])}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        if torch.device(device).type != "cuda":
            base = getattr(type(self), "varaug_base_name", "<Base>")
            raise VarAugError(
                f"{type(self).__name__} needs a CUDA GPU (-device cuda): it measures the GPU's non-deterministic "
                f"kernels, and on the {torch.device(device).type.upper()} PyTorch's kernels are deterministic, so "
                f"it would train {base}_seed0 again. Leave 'nondet' out of the sources on this machine")
        super().__init__(plans, configuration, fold, dataset_json, device)

    def configure_kernels(self) -> Dict[str, Any]:
        return allow_nondeterminism()
