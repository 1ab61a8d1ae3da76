"""``nnunet_varaug predict`` against nnU-Net's own commands and plain numpy/SimpleITK.

One predict run (module scope, ``--save_probabilities``) on Dataset101's two test images plus an anisotropic copy
with a non-trivial origin and direction, with labels; the oracle is ``nnUNetv2_predict --save_probabilities`` of
each replica and ``nnUNetv2_ensemble --save_npz`` of their outputs. nnU-Net's readers, ``nnUNetv2_apply_
postprocessing`` and ``nnUNetv2_evaluate_folder`` run on the output; ``-num_parts`` splits the cases; a large
checkpoint is read once per run.
"""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY, run_cli, run_clis_side_by_side
from predict_helpers import arr, main

pytestmark = pytest.mark.e2e

ENDING = ".nii.gz"


def predict_args(images, out, n=3, labels=None, *extra):
    args = ["predict", "-i", str(images), "-o", str(out), "-d", "101", "-c", "3d_fullres", "-f", "0", "-n", str(n),
            "-tr", TINY, "-device", "cpu", "--quiet", "-npp", "0", *extra]
    return args + (["-l", str(labels)] if labels else [])


def read(path):
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def predicted(seed_replicas, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    images, labels = root / "images", root / "labels"
    shutil.copytree(os.path.join(seed_replicas["raw"], "imagesTs"), images)
    shutil.copytree(os.path.join(seed_replicas["raw"], "labelsTs"), labels)
    # an anisotropic case with a non-trivial origin and direction (x flipped)
    for src, dst in ((images / "case_ts000_0000.nii.gz", images / "aniso_0000.nii.gz"),
                     (labels / "case_ts000.nii.gz", labels / "aniso.nii.gz")):
        img = read(src)
        img.SetSpacing((0.8, 1.1, 2.5))
        img.SetOrigin((-20.5, 13.25, 7.0))
        img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
        sitk.WriteImage(img, str(dst))
    out = root / "out"
    assert main(predict_args(images, out, 3, labels, "--save_probabilities")) == 0
    folders = [root / name for name in seed_replicas["names"]]
    # nnU-Net's own predictions of each replica (the oracle), the three commands side by side
    run_clis_side_by_side(*(("nnUNetv2_predict", "-i", str(images), "-o", str(folder), "-d", "101", "-c", "3d_fullres",
                             "-f", "0", "-tr", name, "--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0")
                            for name, folder in zip(seed_replicas["names"], folders)))
    run_cli("nnUNetv2_ensemble", "-i", *map(str, folders), "-o", str(root / "ensemble"), "-np", "1", "--save_npz")
    cases = sorted(os.path.basename(f)[: -len(ENDING)] for f in glob.glob(str(labels / f"*{ENDING}")))
    return {"root": root, "images": images, "labels": labels, "out": out, "replicas": folders,
            "ensemble": root / "ensemble", "cases": cases}


def probabilities(predicted, case):
    return [np.load(f / f"{case}.npz")["probabilities"] for f in predicted["replicas"]]


def test_consensus_equals_nnunet_ensemble(predicted):
    for case in predicted["cases"]:
        ours, theirs = arr(predicted["out"] / f"{case}{ENDING}"), arr(predicted["ensemble"] / f"{case}{ENDING}")
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), f"{case}: {np.count_nonzero(ours != theirs)} voxels differ"


def test_uncertainty_maps_equal_numpy(predicted):
    for case in predicted["cases"]:
        p = np.stack(probabilities(predicted, case)).astype(np.float64)  # (K, C, *spatial)
        mean = p.mean(axis=0)

        def h(q):
            return -np.sum(np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0), axis=0)

        entropy = h(mean)
        mi = entropy - np.mean([h(q) for q in p], axis=0)
        segs = np.stack([arr(f / f"{case}{ENDING}") for f in predicted["replicas"]])
        consensus = arr(predicted["ensemble"] / f"{case}{ENDING}")
        maps = predicted["out"] / "uncertainty"
        # 5e-4 bits: nnUNetv2_predict's separate processes and predict's in-process run may sum in other orders
        # (one suite run under load: 17 of 32768 voxels differed, by up to 1.3e-4); nats instead of bits is 0.3
        np.testing.assert_allclose(arr(maps / f"{case}_entropy.nii.gz"), entropy, atol=5e-4)
        np.testing.assert_allclose(arr(maps / f"{case}_mutual_information.nii.gz"), np.maximum(mi, 0), atol=5e-4)
        np.testing.assert_allclose(arr(maps / f"{case}_disagreement.nii.gz"), (segs != consensus).mean(axis=0),
                                   atol=1e-6)
        assert entropy.max() > 0.1  # the tiny replicas are unsure somewhere: the comparison is not trivial


def test_outputs_are_in_the_input_grid(predicted):
    assert "aniso" in predicted["cases"]
    for case in predicted["cases"]:
        image = read(predicted["images"] / f"{case}_0000{ENDING}")
        files = [predicted["out"] / f"{case}{ENDING}"] + [predicted["out"] / "uncertainty" / f"{case}_{w}.nii.gz"
                                                          for w in ("entropy", "mutual_information", "disagreement")]
        for f in files:
            out = read(f)
            assert out.GetSize() == image.GetSize(), f
            np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-6, err_msg=str(f))
            np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-5, err_msg=str(f))
            np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-6, err_msg=str(f))


def test_volumes_are_voxel_counts_times_voxel_volume(predicted):
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "volumes.csv", dtype={"label": str})
    assert sorted(table["case"].unique()) == predicted["cases"]
    for case in predicted["cases"]:
        voxel = float(np.prod(read(predicted["images"] / f"{case}_0000{ENDING}").GetSpacing()))
        segs = [arr(f / f"{case}{ENDING}") for f in predicted["replicas"]]
        consensus = arr(predicted["ensemble"] / f"{case}{ENDING}")
        for label in (1, 2):
            row = table[(table["case"] == case) & (table["label"] == str(label))].iloc[0]
            v = np.array([np.count_nonzero(s == label) for s in segs]) * voxel
            assert row["consensus_mm3"] == pytest.approx(np.count_nonzero(consensus == label) * voxel)
            assert row["replica_min_mm3"] == pytest.approx(v.min())
            assert row["replica_max_mm3"] == pytest.approx(v.max())
            assert row["replica_mean_mm3"] == pytest.approx(v.mean())
            assert row["replica_std_mm3"] == pytest.approx(v.std(ddof=1))


def hand_ece_brier(pairs, bins=10):
    """ECE and Brier of (probability, outcome) arrays, by explicit loops over bins."""
    p = np.concatenate([a for a, _ in pairs]).astype(np.float64)
    y = np.concatenate([b for _, b in pairs]).astype(np.float64)
    ece = 0.0
    for b in range(bins):
        inside = (p >= b / bins) & ((p < (b + 1) / bins) if b < bins - 1 else (p <= 1.0))
        if inside.any():
            ece += inside.sum() / p.size * abs(y[inside].mean() - p[inside].mean())
    return ece, float(np.mean((p - y) ** 2))


def test_calibration_csv_matches_hand_computation(predicted):
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "calibration.csv", dtype={"label": str})
    names = [os.path.basename(f) for f in predicted["replicas"]]
    assert list(dict.fromkeys(table["model"])) == names + ["ensemble"]
    probs = {c: probabilities(predicted, c) for c in predicted["cases"]}
    gts = {c: arr(predicted["labels"] / f"{c}{ENDING}") for c in predicted["cases"]}
    for m, model in enumerate(names + ["ensemble"]):
        for label in (0, 1, 2):
            pairs = []
            for c in predicted["cases"]:
                p = probs[c][m] if model != "ensemble" else np.mean(np.stack(probs[c]), axis=0)
                pairs.append((p[label].ravel(), (gts[c] == label).ravel()))
            ece, brier = hand_ece_brier(pairs)
            row = table[(table["model"] == model) & (table["label"] == str(label)) & (table["scope"] == "all")].iloc[0]
            assert row["classwise_ece"] == pytest.approx(ece, abs=1e-5), (model, label)
            assert row["brier"] == pytest.approx(brier, abs=1e-6), (model, label)


def test_review_ranks_by_the_size_aware_score(predicted):
    """review.csv's score by hand (docs/inference.md): per structure (1 − mean pairwise Dice) × min(1, mean replica
    volume / 100 mm³), 1 for a structure no replica finds; the case's score is the largest."""
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "review.csv")
    expected = {}
    for case in predicted["cases"]:
        segs = [arr(f / f"{case}{ENDING}") for f in predicted["replicas"]]
        voxel = float(np.prod(read(predicted["images"] / f"{case}_0000{ENDING}").GetSpacing()))
        scores = []
        for label in (1, 2):
            dices = []
            for a in range(len(segs)):
                for b in range(a + 1, len(segs)):
                    x, y = segs[a] == label, segs[b] == label
                    s = x.sum() + y.sum()
                    dices.append(1.0 if s == 0 else 2 * np.logical_and(x, y).sum() / s)
            volume = np.mean([(seg == label).sum() * voxel for seg in segs])
            scores.append(1.0 if volume == 0 else (1 - float(np.mean(dices))) * min(1.0, volume / 100.0))
        expected[case] = max(scores)
    for _, row in table.iterrows():
        assert row["score"] == pytest.approx(expected[row["case"]], abs=1e-9)
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    assert list(table["rank"]) == list(range(1, len(expected) + 1))


def test_report_embeds_pictures_and_calibration(predicted):
    text = (predicted["out"] / "report.html").read_text()
    # pictures + reliability diagram + risk-coverage curves
    assert text.count("data:image/png;base64,") == len(predicted["cases"]) + 2
    for section in ("structures", "review", "failures", "volumes", "calibration", "pictures"):
        assert f"<!-- section:{section} -->" in text


def test_rerun_skips_and_a_changed_checkpoint_predicts_again(predicted, seed_replicas, tmp_path, monkeypatch,
                                                             capsys):
    import torch

    base = _results_copy(seed_replicas, tmp_path, monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)
    target = out / f"case_ts000{ENDING}"
    before = target.stat().st_mtime_ns
    assert main(predict_args(predicted["images"], out, labels=predicted["labels"])) == 0
    assert "predicted 0 case(s), skipped 3" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == before

    ckpt = base / f"{seed_replicas['names'][1]}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    for w in saved["network_weights"].values():
        if w.is_floating_point():
            w.mul_(1.5)
    torch.save(saved, ckpt)
    assert main(predict_args(predicted["images"], out, labels=predicted["labels"])) == 0
    assert "predicted 3 case(s), skipped 0" in capsys.readouterr().out
    assert target.stat().st_mtime_ns != before


def _results_copy(seed_replicas, tmp_path, monkeypatch):
    results = tmp_path / "results"
    src = seed_replicas["results"]
    for name in seed_replicas["names"]:
        folder = f"{name}__nnUNetPlans__3d_fullres"
        shutil.copytree(os.path.join(src, folder), results / os.path.basename(src) / folder,
                        ignore=shutil.ignore_patterns("validation", "*.png", "checkpoint_latest.pth"))
    monkeypatch.setenv("nnUNet_results", str(results))
    return results / os.path.basename(src)


@pytest.mark.parametrize("problem", ["missing_replica", "other_plans", "extra_channel", "multichannel_file",
                                     "output_is_input", "output_inside_input", "label_of_other_grid",
                                     "cascade", "part_id_out_of_range"])
def test_bad_input_is_refused_and_nothing_written(problem, predicted, seed_replicas, tmp_path, monkeypatch, capsys):
    import json

    images, labels, n = tmp_path / "images", None, 3
    shutil.copytree(predicted["images"], images)
    out = tmp_path / "out"
    expect = {"missing_replica": "nnunet_varaug replicas", "other_plans": "other plans",
              "extra_channel": "channel file", "multichannel_file": "one file per channel",
              "output_is_input": "input folder", "output_inside_input": "input folder",
              "label_of_other_grid": "not the label", "cascade": "nnUNetv2_predict -prev_stage_predictions",
              "part_id_out_of_range": "part ids run from 0"}[problem]
    extra = {"cascade": ["-prev_stage_predictions", str(tmp_path)],
             "part_id_out_of_range": ["-num_parts", "2", "-part_id", "2"]}.get(problem, [])
    if problem == "missing_replica":
        n = 4
    elif problem == "other_plans":
        base = _results_copy(seed_replicas, tmp_path, monkeypatch)
        plans_file = base / f"{seed_replicas['names'][2]}__nnUNetPlans__3d_fullres" / "plans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
        plans_file.write_text(json.dumps(plans))
    elif problem == "extra_channel":
        shutil.copy(images / "case_ts000_0000.nii.gz", images / "case_ts000_0001.nii.gz")
    elif problem == "multichannel_file":
        img = read(images / "case_ts001_0000.nii.gz")
        sitk.WriteImage(sitk.Compose(img, img), str(images / "case_ts001_0000.nii.gz"))
    elif problem == "output_is_input":
        out = images
    elif problem == "output_inside_input":
        out = images / "predictions"
    elif problem == "label_of_other_grid":
        labels = tmp_path / "labels"
        shutil.copytree(predicted["labels"], labels)
        sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(labels / "case_ts001.nii.gz"))
    listing = sorted(os.listdir(images))
    rc = main(predict_args(images, out, n, labels, *extra))
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err, err
    assert sorted(os.listdir(images)) == listing
    if out != images:
        assert not out.exists()


def test_saved_probabilities_are_nnunet_ensembles_files(predicted, seed_replicas):
    """<case>.npz / .pkl as nnU-Net writes them (read with nnU-Net's own readers), equal to nnUNetv2_ensemble
    --save_npz of the replicas' nnUNetv2_predict outputs; dataset.json and plans.json as nnUNetv2_predict leaves."""
    import json

    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.ensembling.ensemble import average_probabilities

    out, ens = predicted["out"], predicted["ensemble"]
    for case in predicted["cases"]:
        ours = average_probabilities([str(out / f"{case}.npz")])  # nnU-Net's reader of .npz probabilities
        theirs = np.load(ens / f"{case}.npz")["probabilities"]
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        props, ref = load_pickle(str(out / f"{case}.pkl")), load_pickle(str(predicted["replicas"][0] / f"{case}.pkl"))
        assert props.keys() == ref.keys()
        for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                    "shape_after_cropping_and_before_resampling"):
            assert np.array_equal(np.asarray(props[key]), np.asarray(ref[key])), key
    for name in ("dataset.json", "plans.json"):
        assert json.loads((out / name).read_text()) == json.loads((predicted["replicas"][0] / name).read_text())


def test_nnunet_postprocessing_and_evaluation_run_on_the_output(predicted, tmp_path):
    """The chain of docs/inference.md: nnUNetv2_apply_postprocessing, then nnUNetv2_evaluate_folder, on predict's
    folder as it is (its dataset.json and plans.json); the Dice in summary.json equals numpy's."""
    import json

    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    pkl = tmp_path / "postprocessing.pkl"
    save_pickle(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1, 2]}]), str(pkl))
    post = tmp_path / "post"
    run_cli("nnUNetv2_apply_postprocessing", "-i", str(predicted["out"]), "-o", str(post), "-pp_pkl_file", str(pkl),
            "-np", "1")
    assert sorted(f for f in os.listdir(post) if f.endswith(ENDING)) == [c + ENDING for c in predicted["cases"]]
    summary = tmp_path / "summary.json"
    run_cli("nnUNetv2_evaluate_folder", str(predicted["labels"]), str(predicted["out"]), "-djfile",
            str(predicted["out"] / "dataset.json"), "-pfile", str(predicted["out"] / "plans.json"), "-o",
            str(summary), "-np", "1")
    metrics = {m["prediction_file"].split(os.sep)[-1]: m["metrics"] for m in json.loads(summary.read_text())
               ["metric_per_case"]}
    for case in predicted["cases"]:
        seg, gt = arr(predicted["out"] / f"{case}{ENDING}"), arr(predicted["labels"] / f"{case}{ENDING}")
        for label in (1, 2):
            a, b = seg == label, gt == label
            want = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
            assert metrics[case + ENDING][str(label)]["Dice"] == pytest.approx(want)


def test_parts_cover_every_case_once(predicted, tmp_path, capsys):
    out = tmp_path / "out"
    parts = []
    for part, workers in ((0, ("-nps", "1")), (1, ("-npp", "1"))):  # background export, background preprocessing
        assert main(predict_args(predicted["images"], out, 3, None, "-num_parts", "2", "-part_id", str(part),
                                 "--continue_prediction", *workers)) == 0
        printed = capsys.readouterr().out
        parts.append(printed)
    assert "not predicted yet" in parts[0] and "not predicted yet" not in parts[1]
    import json

    predicted_by = [set(json.loads((out / f"varaug_predict_part{p}of2.json").read_text())["cases"]) for p in (0, 1)]
    assert not predicted_by[0] & predicted_by[1]
    assert predicted_by[0] | predicted_by[1] == set(predicted["cases"])
    import pandas as pd

    assert sorted(pd.read_csv(out / "review.csv")["case"]) == predicted["cases"]
    for case in predicted["cases"]:
        assert np.array_equal(arr(out / f"{case}{ENDING}"), arr(predicted["out"] / f"{case}{ENDING}"))


def test_a_large_checkpoint_is_read_once_per_run(predicted, seed_replicas, tmp_path, monkeypatch):
    """Checkpoints whose optimizer state is padded far past the weights budget (scaled down: the budget is set
    just above the 3 networks' weights): each replica is read once per run, kept in memory; with the budget below
    the weights, predict goes replica by replica over batches of cases and reads each once per batch."""
    import torch

    from nnunet_varaug.commands.predict import predict_folder
    from nnunet_varaug.inference import schedule
    from nnunet_varaug.inference.ensemble import state_bytes
    from nnunet_varaug.training.experiment import Experiment

    base = _results_copy(seed_replicas, tmp_path, monkeypatch)
    paths = [str(base / f"{n}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth")
             for n in seed_replicas["names"]]
    for p in paths:
        saved = torch.load(p, map_location="cpu", weights_only=False)
        saved["optimizer_state"] = {"padding": torch.zeros(1 << 20)}  # 4 MiB of optimizer state
        torch.save(saved, p)
    weight_bytes = state_bytes(saved["network_weights"])
    assert all(os.path.getsize(p) > weight_bytes + (4 << 20) for p in paths)  # far past the budgets below

    loads = {}
    real_load = torch.load

    def counting_load(f, *a, **kw):
        loads[os.path.realpath(str(f))] = loads.get(os.path.realpath(str(f)), 0) + 1
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    exp = Experiment.from_args(101, "3d_fullres", 0, 3, TINY)
    runs = {}
    for budget, per_batch in (("fits", None), ("over", 2)):
        if per_batch:
            monkeypatch.setattr(schedule, "CASES_PER_BATCH", per_batch)
        loads.clear()
        gib = (3 * weight_bytes + (1 if budget == "fits" else -1)) / 2 ** 30
        result = predict_folder([exp], str(predicted["images"]), str(tmp_path / budget), progress=False,
                                device="cpu", weights_gib=gib)
        assert result["resident"] is (budget == "fits")
        times = 1 if budget == "fits" else 2  # 3 cases in batches of 2
        assert {p: loads.get(os.path.realpath(p), 0) for p in paths} == {p: times for p in paths}
        runs[budget] = tmp_path / budget
    for case in predicted["cases"]:
        for f in (f"{case}{ENDING}", f"uncertainty/{case}_entropy.nii.gz", f"uncertainty/{case}_disagreement.nii.gz"):
            assert np.array_equal(arr(runs["fits"] / f), arr(runs["over"] / f)), f
        assert np.array_equal(arr(runs["fits"] / f"{case}{ENDING}"), arr(predicted["out"] / f"{case}{ENDING}"))
