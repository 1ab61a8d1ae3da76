"""nnU-Net's ``nnUNetPredictor`` for a replica, restored from its final checkpoint as ``nnUNetv2_predict`` does.

``samples`` (on preprocessed training cases) and ``analyze`` (on raw images) predict with the same settings:
sliding window with step 0.5 and Gaussian weighting, mirroring unless ``tta=False``, everything on the device for
CUDA. The predictor finds replica classes (``<Base>_seed<K>`` …) by name, so this module puts the plugin's folder
on ``nnUNet_extTrainer`` first (what ``nnunet_varaug env`` prints), and refuses cascade stages.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import TYPE_CHECKING

from nnunet_varaug.training import registry
from nnunet_varaug.utilities.errors import VarAugError, require_single_stage

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_varaug.training.experiment import Experiment


def torch_device(name: str) -> "torch.device":
    """``torch.device(name)``, refused with a clear error when that device is not available here."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VarAugError(f"-device {name}: no CUDA device is available here; use -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise VarAugError("-device mps: MPS is not available here; use -device cpu")
    return torch.device(name)


def make_predictor(exp: "Experiment", trainer: str, device: "torch.device", tta: bool = True,
                   who: str = "prediction", checkpoint: str = "checkpoint_final.pth",
                   step_size: float = 0.5) -> "nnUNetPredictor":
    """An ``nnUNetPredictor`` with ``trainer``'s final checkpoint of ``exp``'s fold loaded.

    Args:
        exp: the :class:`nnunet_varaug.training.experiment.Experiment` (model folder, fold).
        trainer: the replica's trainer name.
        device: a ``torch.device``.
        tta: mirroring test-time augmentation, as ``nnUNetv2_predict`` does by default.
        who: what asks, named in the cascade refusal.
        checkpoint: the checkpoint file name (``nnUNetv2_predict -chk``).
        step_size: the sliding window's step, as a fraction of the patch (``nnUNetv2_predict -step_size``).

    Raises:
        VarAugError: the configuration is a cascade stage.
    """
    predictor = nnunet_predictor(exp.model_folder(trainer), exp.fold, device, tta, checkpoint, step_size)
    require_single_stage(exp.configuration, predictor.configuration_manager.previous_stage_name, who)
    return predictor


def nnunet_predictor(model_folder: str, fold, device: "torch.device", tta: bool = True,
                     checkpoint: str = "checkpoint_final.pth", step_size: float = 0.5) -> "nnUNetPredictor":
    """nnU-Net's ``nnUNetPredictor`` for ``model_folder``'s ``fold`` with ``nnUNetv2_predict``'s settings (Gaussian
    weighting, mirroring unless ``tta`` is off), the plugin's trainers findable by name. The one place where the
    package builds an nnU-Net predictor."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    os.environ["nnUNet_extTrainer"] = registry.ext_trainer_value()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,), checkpoint_name=checkpoint)
    return predictor
