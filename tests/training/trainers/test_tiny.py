"""``nnUNetTrainerTiny`` (trainers/tiny.py): nnU-Net's trainer, narrower and shorter, mirroring one axis at test time."""
from __future__ import annotations

import pytest

from conftest import trainer_in_process

pytestmark = pytest.mark.nnunet


def test_test_time_mirroring_uses_the_first_axis_and_training_keeps_nnunets(synthetic_3d):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny

    stock, tiny = (trainer_in_process(cls, synthetic_3d["name"], 0) for cls in (nnUNetTrainer, nnUNetTrainerTiny))
    stock_config = stock.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    tiny_config = tiny.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert stock_config[3] == (0, 1, 2) and stock.inference_allowed_mirroring_axes == (0, 1, 2)
    assert tiny_config[3] == stock_config[3], "training's mirroring augmentation is nnU-Net's"
    assert tiny.inference_allowed_mirroring_axes == (0,)


def test_validation_without_worker_processes_writes_what_nnunets_pools_write(synthetic_3d, tmp_path, monkeypatch):
    """The same trainer validated by nnU-Net's perform_actual_validation (spawned export and metrics pools) and
    by the tiny trainer's (those pools in its process): the same segmentations voxel for voxel and the same
    metrics; no process started by the latter, and nnU-Net's modules left as they were."""
    import json
    import multiprocessing
    import os

    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    torch.manual_seed(0)
    trainer = trainer_in_process(nnUNetTrainerTiny, synthetic_3d["name"], 0)
    trainer.initialize()  # untrained weights: the predictions are some labelling, the same in both runs
    for how in ("nnunet", "tiny"):
        trainer.output_folder, trainer.log_file = str(tmp_path / how), str(tmp_path / f"{how}.txt")
        os.makedirs(trainer.output_folder)
        if how == "nnunet":
            nnUNetTrainer.perform_actual_validation(trainer)
            continue
        with monkeypatch.context() as mp:
            mp.setattr(multiprocessing, "get_context", no_pool)
            trainer.perform_actual_validation()
    assert trainer_module.multiprocessing is multiprocessing and evaluate_predictions.multiprocessing is multiprocessing

    folders = [tmp_path / how / "validation" for how in ("nnunet", "tiny")]
    files = [sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz")) for folder in folders]
    assert files[0] == files[1] and len(files[0]) == len(trainer.do_split()[1]) > 0
    labelled = 0
    for name in files[0]:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))) for folder in folders)
        assert np.array_equal(a, b), name
        labelled += int((a > 0).any())
    assert labelled > 0, "the check needs predictions with foreground"
    summaries = [json.load(open(folder / "summary.json")) for folder in folders]
    assert summaries[0]["mean"] == summaries[1]["mean"]
    assert [c["metrics"] for c in summaries[0]["metric_per_case"]] == \
        [c["metrics"] for c in summaries[1]["metric_per_case"]]
