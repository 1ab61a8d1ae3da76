"""The sample-set checks a ``_varaug`` trainer makes before training, on a hand-made set of Dataset101 fold 4.

A set whose maps were made from another version of a case's preprocessed segmentation is refused (same shapes, so
only the recorded sha256 can tell), and a run resumed from a checkpoint of another sample set says so in its log.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import SYNTHETIC_3D_ID, TINY

pytestmark = pytest.mark.nnunet

FOLD = 4
FIX = f"nnunet_varaug samples -d {SYNTHETIC_3D_ID} -c 3d_fullres -f {FOLD} -n 2 -tr {TINY}"


def experiment():
    from nnunet_varaug.training.experiment import Experiment

    return Experiment.from_args(SYNTHETIC_3D_ID, "3d_fullres", FOLD, 2, TINY)


def write_set(swap: bool = False):
    """GT and GT with the lesion merged into the organ (or the reverse order), with each case's segmentation
    sha256 recorded, as ``samples`` records it."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_varaug.training.sampleset import write_sample_set

    exp = experiment()
    cases = sorted(exp.split()[0])
    ds = nnUNetDatasetBlosc2(exp.preprocessed_folder, cases)
    maps = {}
    for case in cases:
        gt = np.asarray(ds.load_case(case)[1][:])[0].astype(np.int8)
        pair = [gt, np.where(gt == 2, 1, gt)]
        maps[case] = np.stack(pair[::-1] if swap else pair).astype(np.int8)
    write_sample_set(exp.samples_folder, maps, dataset=exp.dataset, plans="nnUNetPlans", configuration="3d_fullres",
                     fold=FOLD, replica_names=["a", "b"], patch_size=(32, 32, 32), base=TINY,
                     preprocessed_folder=exp.preprocessed_folder)
    return exp, cases


def trainer(name: str = f"{TINY}_varaug"):
    from nnunet_varaug.training.registry import resolve

    exp = experiment()
    return resolve(name)({**exp.plans_json, "continue_training": False}, "3d_fullres", FOLD, exp.dataset_json,
                         device=torch.device("cpu"))


def test_set_made_from_another_preprocessing_is_refused(synthetic_3d, tmp_path):
    """Preprocessed again to the same shapes: only the segmentation's sha256 in the manifest tells."""
    import blosc2

    from nnunet_varaug.utilities.errors import VarAugError

    exp, cases = write_set()
    assert trainer().varaug_prepare()["cases"][cases[0]]["seg_sha256"]
    path = os.path.join(exp.preprocessed_folder, f"{cases[0]}_seg.b2nd")
    backup = str(tmp_path / "seg.b2nd")  # not beside it: nnU-Net infers the dataset class from the file endings
    shutil.copy2(path, backup)
    try:
        original = blosc2.open(path, mode="r")
        seg = np.asarray(original[:])
        where = tuple(int(i[0]) for i in np.nonzero(seg >= 0))
        seg[where] = 1 if seg[where] != 1 else 2  # one voxel relabelled; shape, dtype and chunking unchanged
        blosc2.asarray(seg, urlpath=path, mode="w", chunks=original.chunks, blocks=original.blocks)
        with pytest.raises(VarAugError, match=f"samples of case {cases[0]} were made from another version") as info:
            trainer().varaug_prepare()
        assert f"rebuild them with `{FIX}`" in str(info.value)
    finally:
        shutil.copy2(backup, path)
    trainer().varaug_prepare()  # the original preprocessing: accepted again


def test_resumed_run_warns_when_its_sample_set_changed(synthetic_3d, tmp_path, capsys):
    from nnunet_varaug.training.sampleset import manifest_fingerprint

    exp, _ = write_set()
    first = trainer()
    first.initialize()
    first.varaug_prepare()
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    first.save_checkpoint(checkpoint)
    old = manifest_fingerprint(exp.samples_folder)

    def resumed_log() -> str:
        capsys.readouterr()
        again = trainer()
        again.initialize()
        again.load_checkpoint(checkpoint)
        again.varaug_prepare()
        return capsys.readouterr().out

    assert "WARNING" not in resumed_log()  # the same set: nothing to say
    write_set(swap=True)  # the same cases and shapes, other maps
    new = manifest_fingerprint(exp.samples_folder)
    assert new != old
    log = resumed_log()
    assert "WARNING: the sample set changed since the checkpoint this run continues from" in log
    assert f"{old[:12]}… -> {new[:12]}…" in log
