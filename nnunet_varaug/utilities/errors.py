"""User errors: the one error type, and the one refusal several commands share (cascade stages).

``VarAugError`` is a problem the user can fix, with a message that says what to run; every command catches it and
exits with 2 (``nnunet_varaug.cli``), trainers raise it inside ``nnUNetv2_train``. This module imports nothing of
the package, so any module, including those that run inside ``nnUNetv2_train``, can use it.
"""
from __future__ import annotations

from typing import Optional


class VarAugError(RuntimeError):
    """A problem the user can fix; the message says what is wrong and what to run. The CLI exits with 2."""


def require_single_stage(configuration: str, previous_stage: Optional[str], who: str) -> None:
    """Refuse a cascade stage (a configuration that takes the previous stage's segmentation as input).

    Args:
        configuration: the configuration's name, e.g. ``3d_cascade_fullres``.
        previous_stage: its ``previous_stage`` in the plans (None for a single-stage configuration).
        who: what refuses it, for the message (e.g. ``"variability samples"``, ``"analyze"``, a trainer's name).

    Raises:
        VarAugError: ``previous_stage`` is set.
    """
    if previous_stage is not None:
        raise VarAugError(f"{who}: '{configuration}' is a cascade configuration (it needs the previous stage's "
                          f"segmentation, {previous_stage}, as input); only single-stage configurations such as "
                          f"3d_fullres, 3d_lowres or 2d are supported: use one of them")
