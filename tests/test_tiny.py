"""``nnUNetTrainerTiny`` (trainers/tiny.py): nnU-Net's trainer, narrower and shorter, mirroring one axis at test time."""
from __future__ import annotations

import pytest

from conftest import trainer_in_process

pytestmark = pytest.mark.nnunet


def test_test_time_mirroring_uses_the_first_axis_and_training_keeps_nnunets(synthetic_3d):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_varaug.trainers.tiny import nnUNetTrainerTiny

    stock, tiny = (trainer_in_process(cls, synthetic_3d["name"], 0) for cls in (nnUNetTrainer, nnUNetTrainerTiny))
    stock_config = stock.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    tiny_config = tiny.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert stock_config[3] == (0, 1, 2) and stock.inference_allowed_mirroring_axes == (0, 1, 2)
    assert tiny_config[3] == stock_config[3], "training's mirroring augmentation is nnU-Net's"
    assert tiny.inference_allowed_mirroring_axes == (0,)
