"""``nnunet_varaug samples``: the stored maps are the replicas' predictions, written atomically and resumably; a
sample set that does not fit its trainer is refused with the command that fixes it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SYNTHETIC_3D_ID, TINY, run_cli, trainer_in_process

FLAGS = ["-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "3", "-tr", TINY]
COMMAND = f"nnunet_varaug samples -d {SYNTHETIC_3D_ID} -c 3d_fullres -f 0 -n 3 -tr {TINY}"


def experiment(n: int = 3, fold=0):
    from nnunet_varaug.training.experiment import Experiment

    return Experiment.from_args(SYNTHETIC_3D_ID, "3d_fullres", fold, n, TINY)


@pytest.fixture(scope="module")
def sample_set(seed_replicas):
    proc = run_cli("nnunet_varaug", "samples", *FLAGS, "-device", "cpu", "--no-tta")  # TTA: see test_varaug's e2e
    exp = experiment()
    return {**seed_replicas, "exp": exp, "folder": exp.samples_folder, "stdout": proc.stdout}


def mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


@pytest.mark.e2e
def test_maps_are_the_replicas_predictions(sample_set, tmp_path):
    """Files, manifest and content: replica k's map equals what nnUNetv2_predict writes for that replica."""
    from nnunet_varaug.utilities.fileio import file_sha256
    from nnunet_varaug.training.sampleset import MANIFEST, read_sample_array

    exp, folder = sample_set["exp"], sample_set["folder"]
    cases = sorted(exp.split()[0])
    manifest = json.load(open(os.path.join(folder, MANIFEST)))
    assert manifest["case_list"] == cases and manifest["num_replicas"] == 3 and manifest["tta"] is False
    assert [r["name"] for r in manifest["replicas"]] == sample_set["names"]
    for r in manifest["replicas"]:
        ckpt = os.path.join(os.environ["nnUNet_results"], r["checkpoint"])
        assert r["sha256"] == file_sha256(ckpt)
    assert sorted(f for f in os.listdir(folder) if f.endswith(".b2nd")) == [f"{c}.b2nd" for c in cases]
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(exp.preprocessed_folder, cases)
    for case in cases:
        maps = read_sample_array(os.path.join(folder, f"{case}.b2nd"))
        seg = np.asarray(ds.load_case(case)[1][:])
        assert maps.dtype == np.int8 and maps.shape == (3, *seg.shape[1:])
        assert manifest["cases"][case]["shape"] == list(maps.shape)
        assert set(np.unique(maps)) <= {-1, 0, 1, 2}
        assert np.all(maps[:, seg[0] == -1] == -1)  # outside the nonzero mask copied from GT
    # independent computation: the stock prediction command on two training cases, replica 1
    images = tmp_path / "images"
    images.mkdir()
    for case in cases[:2]:
        os.symlink(os.path.join(sample_set["raw"], "imagesTr", f"{case}_0000.nii.gz"), images / f"{case}_0000.nii.gz")
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", str(SYNTHETIC_3D_ID),
            "-c", "3d_fullres", "-f", "0", "-tr", sample_set["names"][1], "-device", "cpu", "-npp", "1", "-nps", "1",
            "--disable_tta")
    transpose = exp.plans_json["transpose_forward"]
    for case in cases[:2]:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f"{case}.nii.gz")))
        stored = read_sample_array(os.path.join(folder, f"{case}.b2nd"))[1]
        assert stored.shape == predicted.transpose(transpose).shape  # synthetic: no cropping, no resampling
        assert np.array_equal(stored, predicted.transpose(transpose).astype(np.int8))


@pytest.mark.e2e
def test_rerun_skips_force_rebuilds_and_missing_case_is_redone(sample_set, capsys):
    """In-process (the command itself ran in the fixture): what a rerun keeps and what it redoes."""
    from nnunet_varaug.inference.samples import write_samples

    exp, folder = sample_set["exp"], sample_set["folder"]

    def rerun(**kwargs):
        write_samples(exp, device="cpu", progress=False, tta=False, **kwargs)
        return capsys.readouterr().out

    before = mtimes(folder)
    assert "up to date" in rerun() and mtimes(folder) == before
    victim = sorted(f for f in before if f.endswith(".b2nd"))[0]
    os.remove(os.path.join(folder, victim))
    assert "wrote 1 case(s), kept 7" in rerun()
    now = mtimes(folder)
    assert [f for f in now if f.endswith(".b2nd") and now[f] != before[f]] == [victim]
    assert "wrote 8 case(s), kept 0" in rerun(force=True)


@pytest.mark.e2e
def test_interrupted_run_leaves_nothing_trusted(sample_set, monkeypatch, capsys):
    """A run killed after one case (and in the middle of writing the next) has no manifest: trainers refuse the
    set, the half-written file is never read, and the next run keeps the finished case and completes the rest."""
    from nnunet_varaug.inference import samples
    from nnunet_varaug.training import sampleset
    from nnunet_varaug.utilities.errors import VarAugError

    exp, folder = sample_set["exp"], sample_set["folder"]
    real_save = sampleset.save_sample_array
    calls = []

    def dies_on_second_case(maps, path, patch_size):
        calls.append(path)
        if len(calls) == 2:  # killed while writing: a partial file under the temporary name
            with open(os.path.join(folder, f".{os.path.basename(path)[:-5]}.999.partial.b2nd"), "wb") as f:
                f.write(b"\0" * 100)
            raise KeyboardInterrupt
        return real_save(maps, path, patch_size)

    monkeypatch.setattr(sampleset, "save_sample_array", dies_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        samples.write_samples(exp, device="cpu", tta=False, force=True, progress=False)
    assert not os.path.exists(os.path.join(folder, sampleset.MANIFEST))
    cases = sorted(exp.split()[0])
    with pytest.raises(VarAugError, match="left no manifest\\): run `nnunet_varaug samples"):
        sampleset.validate_sample_set(folder, plans="nnUNetPlans", configuration="3d_fullres", fold=0, cases=cases,
                                      shapes={}, fix=COMMAND)
    monkeypatch.setattr(sampleset, "save_sample_array", real_save)
    samples.write_samples(exp, device="cpu", tta=False, progress=False)
    assert "wrote 7 case(s), kept 1" in capsys.readouterr().out
    assert not [f for f in os.listdir(folder) if "partial" in f]
    manifest = sampleset.read_manifest(folder)
    assert manifest["case_list"] == cases
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(exp.preprocessed_folder, cases)
    shapes = {c: tuple(ds.load_case(c)[1].shape[1:]) for c in cases}
    sampleset.validate_sample_set(folder, plans="nnUNetPlans", configuration="3d_fullres", fold=0, cases=cases,
                                  shapes=shapes, fix=COMMAND)


@pytest.mark.e2e
def test_replicas_missing_or_unfinished_refused(seed_replicas):
    proc = run_cli("nnunet_varaug", "samples", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "5",
                   "-tr", TINY, "-device", "cpu", check=False)
    assert proc.returncode == 2
    assert f"{TINY}_seed3, {TINY}_seed4" in proc.stderr
    assert f"nnunet_varaug replicas -d {SYNTHETIC_3D_ID} -c 3d_fullres -f 0 -n 5 -tr {TINY}" in proc.stderr


# ---- the reading side: what a VarAug trainer refuses ------------------------------------------------------------------
def build_trainer(name: str, fold: int, plans_edit=None):
    config = "3d_fullres" if plans_edit is None else "3d_cascade_fullres"
    return trainer_in_process(name, experiment(fold=fold).dataset, fold, config, plans_edit)


def hand_made_set(fold: int):
    """GT and GT with the lesion merged into the organ, as a two-replica sample set of ``fold``."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_varaug.training.sampleset import write_sample_set

    exp = experiment(fold=fold)
    cases = exp.split()[0]
    ds = nnUNetDatasetBlosc2(exp.preprocessed_folder, list(cases))
    maps = {}
    for case in cases:
        gt = np.asarray(ds.load_case(case)[1][:])[0].astype(np.int8)
        maps[case] = np.stack([gt, np.where(gt == 2, 1, gt)]).astype(np.int8)
    write_sample_set(exp.samples_folder, maps, dataset=exp.dataset, plans="nnUNetPlans", configuration="3d_fullres",
                     fold=fold, replica_names=["a", "b"], patch_size=(32, 32, 32), base=TINY)
    return exp, cases


def refused(fold: int, match: str, trainer: str = f"{TINY}_varaug"):
    from nnunet_varaug.training.experiment import VarAugError

    with pytest.raises(VarAugError, match=match) as info:
        build_trainer(trainer, fold).varaug_prepare()
    return str(info.value)


@pytest.mark.nnunet
def test_bad_sample_sets_refused_with_the_fix(synthetic_3d):
    from nnunet_varaug.training.sampleset import MANIFEST, save_manifest

    fold = 3
    exp, cases = hand_made_set(fold)
    folder = exp.samples_folder
    fix = f"nnunet_varaug samples -d {SYNTHETIC_3D_ID} -c 3d_fullres -f {fold} -n 2 -tr {TINY}"
    trainer = build_trainer(f"{TINY}_varaug_p25", fold)
    assert trainer.varaug_prepare()["num_replicas"] == 2 and trainer.varaug_num_samples == 2
    manifest = json.load(open(os.path.join(folder, MANIFEST)))

    def with_manifest(**changes):
        save_manifest(folder, {**manifest, **changes})

    # samples missing for some training cases
    with_manifest(cases={c: e for c, e in manifest["cases"].items() if c != cases[0]})
    assert f"missing for 1 training case(s): {cases[0]}" in refused(fold, "does not match the case list")
    assert f"update it with `{fix}`" in refused(fold, "case list")
    # a manifest made for other plans, configuration or fold
    for key, value in (("plans", "nnUNetResEncUNetMPlans"), ("configuration", "2d"), ("fold", "0")):
        with_manifest(**{key: value})
        assert f"rebuild it with `{fix}`" in refused(fold, f"made for {key} '{value}'")
    # a sample array whose shape differs from its case
    shape = manifest["cases"][cases[1]]["shape"]
    with_manifest(cases={**manifest["cases"], cases[1]: {**manifest["cases"][cases[1]],
                                                           "shape": [shape[0], shape[1] - 1, *shape[2:]]}})
    assert f"`{fix} --force`" in refused(fold, f"samples of case {cases[1]} have shape")
    # a corrupt file
    with_manifest()
    path = os.path.join(folder, f"{cases[2]}.b2nd")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert f"run `{fix}` to rewrite" in refused(fold, f"samples of case {cases[2]} are corrupt")
    # no sample set at all: the exact command (K from the replicas already trained: none on this fold)
    os.remove(os.path.join(folder, MANIFEST))
    message = refused(fold, "no variability samples")
    assert f"nnunet_varaug replicas -d {SYNTHETIC_3D_ID} -c 3d_fullres -f {fold} -n 10 -tr {TINY}" in message
    hand_made_set(fold)  # leave a valid set behind


@pytest.mark.e2e
def test_missing_samples_refused_by_nnunet_train(seed_replicas):
    """Through nnUNetv2_train itself; K in the command is the number of finished replicas (3 on fold 0)."""
    env = os.environ.copy()
    env["nnUNet_preprocessed"] = os.environ["nnUNet_preprocessed"]
    exp = experiment()
    manifest = os.path.join(exp.samples_folder, "manifest.json")
    moved = manifest + ".away"
    if os.path.isfile(manifest):
        os.replace(manifest, moved)
    try:
        proc = run_cli("nnUNetv2_train", str(SYNTHETIC_3D_ID), "3d_fullres", "0", "-tr", f"{TINY}_varaug",
                       "-device", "cpu", check=False)
    finally:
        if os.path.isfile(moved):
            os.replace(moved, manifest)
    assert proc.returncode != 0
    assert f"run `{COMMAND}`" in proc.stdout + proc.stderr


@pytest.mark.nnunet
def test_cascade_refused(synthetic_3d):
    from nnunet_varaug.training.experiment import VarAugError

    def add_cascade(plans):
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

    with pytest.raises(VarAugError, match="cascade configuration"):
        build_trainer(f"{TINY}_varaug", 0, add_cascade).initialize()


@pytest.mark.unit
def test_p_outside_unit_interval_refused_by_name():
    from nnunet_varaug.training.registry import resolve
    from nnunet_varaug.utilities.names import TrainerNameError

    with pytest.raises(TrainerNameError, match="outside \\[0, 1\\]"):
        resolve(f"{TINY}_varaug_p150")


@pytest.mark.e2e
def test_retrained_replica_rebuilds_every_case_from_its_new_checkpoint(sample_set, capsys):
    """A replica trained again (here: seed0's checkpoint carrying seed1's weights) makes every map stale: the rerun
    predicts all cases again, channel 0 then equals channel 1 voxel for voxel, and the manifest lists the new
    checkpoint's sha256."""
    from conftest import weights_of
    from nnunet_varaug.utilities.fileio import file_sha256
    from nnunet_varaug.training.sampleset import read_manifest, read_sample_array
    from nnunet_varaug.inference.samples import write_samples

    exp, folder = sample_set["exp"], sample_set["folder"]
    names = sample_set["names"]
    write_samples(exp, device="cpu", tta=False, progress=False)  # as the fixture left it, whatever ran before
    files = sorted(f for f in os.listdir(folder) if f.endswith(".b2nd"))
    assert any(not np.array_equal(*read_sample_array(os.path.join(folder, f))[:2]) for f in files)
    capsys.readouterr()
    checkpoint = exp.final_checkpoint(names[0])
    try:
        with weights_of(checkpoint, exp.final_checkpoint(names[1])):
            write_samples(exp, device="cpu", tta=False, progress=False)
            assert "wrote 8 case(s), kept 0" in capsys.readouterr().out
            for f in files:
                maps = read_sample_array(os.path.join(folder, f))
                assert np.array_equal(maps[0], maps[1]), f
            assert read_manifest(folder)["replicas"][0]["sha256"] == file_sha256(checkpoint)
    finally:
        write_samples(exp, device="cpu", tta=False, progress=False)  # the set of the original checkpoints again
