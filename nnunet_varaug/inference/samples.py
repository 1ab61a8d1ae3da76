"""``nnunet_varaug samples``: predict the replicas' label maps of a fold's training cases and store them.

It loads every training case of a fold with nnU-Net's dataset class, runs each replica's network on the
preprocessed array with nnU-Net's own sliding-window predictor (no resampling), turns logits into a label map with
the label manager (regions included), copies the ground truth's -1 (outside the nonzero mask) and ignore-label
voxels into every map, and stores the K maps of a case in the sample-set format of :mod:`nnunet_varaug.training.sampleset`.
A case is predicted again when a replica's checkpoint, the TTA setting or the case's preprocessed segmentation
changed (sha256s in the manifest); the manifest is written last.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import numpy as np

from nnunet_varaug.utilities.errors import VarAugError, require_single_stage
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256, write_json
from nnunet_varaug.inference.predictor import make_predictor, torch_device
from nnunet_varaug.training.sampleset import (MANIFEST, PARTIAL, PARTIAL_SUFFIX, SAMPLE_DTYPE, build_manifest, read_manifest,
                                     sample_file, sample_set_identity, save_manifest, save_sample_array, seg_digest)


def _identity(exp: Experiment, replicas: List[dict], tta: bool) -> dict:
    return sample_set_identity(exp.dataset, exp.plans, exp.configuration, exp.fold, replicas, tta)


def _reusable_cases(folder: str, identity: dict) -> Dict[str, dict]:
    """Case entries of an earlier run with the same identity whose files are still intact."""
    found: Dict[str, dict] = {}
    for name in (MANIFEST, PARTIAL):
        try:
            old = read_manifest(folder, name)
        except VarAugError:
            continue
        if old is None or {k: old.get(k) for k in identity} != identity:
            continue
        for case, entry in old["cases"].items():
            path = sample_file(folder, case)
            if case not in found and os.path.isfile(path) and file_sha256(path) == entry.get("sha256"):
                found[case] = entry
    return found


def _remove_stale(folder: str) -> None:
    """Temporary files of interrupted runs (never trusted, never reused)."""
    for f in os.listdir(folder):
        if f.endswith(PARTIAL_SUFFIX) or f.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, f))
            except OSError:
                pass


def predict_case_maps(predictors, data: np.ndarray, seg: np.ndarray, ignore_label: Optional[int],
                      progress=None) -> np.ndarray:
    """K label maps ``(K, X, Y, Z)`` int8 of one preprocessed case, GT's -1 and ignore voxels copied in."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    maps = np.empty((len(predictors), *seg.shape[1:]), dtype=SAMPLE_DTYPE)
    keep = seg[0] == -1
    if ignore_label is not None:
        keep |= seg[0] == ignore_label
    for k, predictor in enumerate(predictors):
        logits = predictor.predict_sliding_window_return_logits(x)
        labels = predictor.label_manager.convert_logits_to_segmentation(logits)
        labels = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
        maps[k] = labels.astype(SAMPLE_DTYPE)
        maps[k][keep] = seg[0][keep]
        if progress is not None:
            progress.update(1)
    return maps


def write_samples(exp: Experiment, device: str = "cpu", tta: bool = True, force: bool = False,
                  progress: bool = True) -> str:
    """Write (or complete) the sample set of ``exp``'s replicas and return its folder.

    Cases already written by an earlier run with the same replicas (checkpoint sha256s), plans, configuration,
    fold and TTA setting are kept unless ``force``; everything else is predicted. The manifest is written last.

    Raises:
        VarAugError: replicas missing or unfinished, a cascade configuration, labels that do not fit int8.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    names = exp.require_finished()
    plans_manager = PlansManager(exp.plans_json)
    config = plans_manager.get_configuration(exp.configuration)
    require_single_stage(exp.configuration, config.previous_stage_name, "variability samples")
    label_manager = plans_manager.get_label_manager(exp.dataset_json)
    if max(label_manager.all_labels) > np.iinfo(SAMPLE_DTYPE).max:
        raise VarAugError(f"{exp.dataset} has labels up to {max(label_manager.all_labels)}; variability samples are "
                          f"stored as int8 and support labels up to {np.iinfo(SAMPLE_DTYPE).max}")
    cases = sorted(exp.split()[0])
    folder = exp.samples_folder
    fix = f"nnunet_varaug samples {exp.flags}"
    dev = torch_device(device)

    replicas = [{"name": n, "checkpoint": os.path.relpath(exp.final_checkpoint(n), os.environ["nnUNet_results"]),
                 "sha256": file_sha256(exp.final_checkpoint(n))} for n in names]
    identity = _identity(exp, replicas, tta)
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder)
    seg_digests = {c: seg_digest(exp.preprocessed_folder, c) for c in cases}
    done = {} if force else {c: e for c, e in _reusable_cases(folder, identity).items()
                             if c in seg_digests and e.get("seg_sha256") == seg_digests[c]}
    todo = [c for c in cases if c not in done]
    manifest_path = os.path.join(folder, MANIFEST)
    if not todo:
        current = read_manifest(folder) if os.path.isfile(manifest_path) else None
        if current is not None and {k: current.get(k) for k in identity} == identity and \
                sorted(current["cases"]) == cases:
            print(f"sample set up to date: {folder} ({len(cases)} cases x {len(names)} replicas)")
            return folder
    # from here on the folder is being changed: the old manifest no longer describes it
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)

    dataset = infer_dataset_class(exp.preprocessed_folder)(exp.preprocessed_folder, list(cases))
    state = {**identity, "cases": {c: done[c] for c in cases if c in done}}
    write_json(os.path.join(folder, PARTIAL), state, indent=1)
    if todo:
        predictors = [make_predictor(exp, n, dev, tta, "variability samples") for n in names]
        bar = tqdm(total=len(todo) * len(names), desc="samples (cases x replicas)", unit="map",
                   disable=not progress, file=sys.stderr)
        with bar:
            for case in todo:
                data, seg, _, _ = dataset.load_case(case)
                seg = np.asarray(seg[:])
                maps = predict_case_maps(predictors, np.asarray(data[:]), seg, label_manager.ignore_label, bar)
                path = sample_file(folder, case)
                digest = save_sample_array(maps, path, config.patch_size)
                state["cases"][case] = {"shape": [int(s) for s in maps.shape], "sha256": digest,
                                        "bytes": os.path.getsize(path), "seg_sha256": seg_digests[case]}
                write_json(os.path.join(folder, PARTIAL), state, indent=1)
    # files of cases that are no longer training cases are not part of the set
    for f in os.listdir(folder):
        if f.endswith(".b2nd") and f[:-5] not in state["cases"]:
            os.remove(os.path.join(folder, f))

    manifest = build_manifest(identity, {c: state["cases"][c] for c in cases}, base=exp.base, kind=exp.kind,
                              start=exp.start, patch_size=config.patch_size, ignore_label=label_manager.ignore_label,
                              regions=label_manager.has_regions, command=fix + ("" if tta else " --no-tta"))
    save_manifest(folder, manifest)
    os.remove(os.path.join(folder, PARTIAL))
    print(f"wrote {len(todo)} case(s), kept {len(cases) - len(todo)}: {folder} "
          f"({len(cases)} cases x {len(names)} replicas)")
    return folder
