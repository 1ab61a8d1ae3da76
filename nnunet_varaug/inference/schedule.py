"""The order of work of one ``predict`` run: when each case is preprocessed and when each model predicts it.

Two orders, chosen by whether all models' network weights fit their budget (:attr:`Weights.resident
<nnunet_varaug.inference.ensemble.Weights>`):

* **case by case** (the weights all in memory, each read once per run): per case, preprocess once, then every
  model in turn, then hand the finished ensemble over;
* **model by model over a batch** of :data:`CASES_PER_BATCH` cases (the weights do not fit): the batch's cases
  are preprocessed into the scratch folder, then each model is read once and predicts every case of the batch;
  between models each case's running sums wait on disk (``sum.npy``, ``entropy.npy``). Each model is read once
  per batch, never once per case.

In both, each model's label map goes to a file in the scratch folder as soon as it is made
(:class:`~nnunet_varaug.evaluation.chunked.LabelMaps`), so memory does not grow with the number of models.
``-npp N`` preprocesses up to N cases ahead in N background processes (nnU-Net's spawn context; 0: in this
process when the case comes).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.evaluation import calibration, temperature, uncertainty
from nnunet_varaug.evaluation.chunked import LabelMaps, label_dtype
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.inference.ensemble import Weights, add_calibration, predict_model, preprocess

CASES_PER_BATCH = 8
"""Cases per batch when the models' weights do not fit their budget (each model is read once per batch)."""


@dataclass
class Finished:
    """One case with every model added: its ensemble (not yet finished), properties, ground truth, counts."""

    case: Case
    ensemble: uncertainty.RunningEnsemble
    properties: dict
    gt: Optional[np.ndarray] = None
    calibration: Optional[calibration.CalibrationCounts] = None


class Scratch:
    """A run's scratch folder (``OUT/.varaug_scratch[_part<i>]``): one subfolder per case, removed when done."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left
        os.makedirs(folder)

    def case(self, name: str) -> str:
        path = os.path.join(self.folder, name)
        os.makedirs(path, exist_ok=True)
        return path

    def drop(self, name: str) -> None:
        shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- preprocessing -----------------------------------------------------------------------------------------------
def preprocess_to_file(images: List[str], plans_manager, configuration_manager, dataset_json: dict,
                       stem: str) -> str:
    """Preprocess one case into ``stem.npy`` + ``stem.pkl`` (run in a background process); returns ``stem``."""
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, props = configuration_manager.preprocessor_class(verbose=False).run_case(
            images, None, plans_manager, configuration_manager, dataset_json)
    np.save(stem + ".npy", data)
    with open(stem + ".pkl", "wb") as f:
        pickle.dump(props, f)
    return stem


def load_preprocessed(stem: str, remove: bool = False):
    import torch

    data = np.load(stem + ".npy")
    with open(stem + ".pkl", "rb") as f:
        props = pickle.load(f)
    if remove:
        os.remove(stem + ".npy")
        os.remove(stem + ".pkl")
    return torch.from_numpy(data), props


def preprocessed(predictor, cases: Sequence[Case], scratch: Scratch, workers: int, verbose: bool = False,
                 on_disk: bool = False) -> Iterator[Tuple[Case, Optional[object], Optional[dict], str]]:
    """``(case, data, properties, stem)`` in case order. With ``workers`` > 0, up to that many cases are prepared
    ahead in background processes (written to the scratch folder, read back here). ``on_disk``: leave every case
    in ``stem.npy``/``.pkl`` and yield no data (the model-by-model order reads it once per model)."""
    stems = {c.name: os.path.join(scratch.case(c.name), "data") for c in cases}
    if workers <= 0:
        for case in cases:
            data, props = preprocess(predictor, case.images, verbose)
            if on_disk:
                np.save(stems[case.name] + ".npy", data.numpy())
                with open(stems[case.name] + ".pkl", "wb") as f:
                    pickle.dump(props, f)
                data = props = None
            yield case, data, props, stems[case.name]
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        waiting, queue = deque(cases), deque()
        while waiting or queue:
            while waiting and len(queue) < workers:
                case = waiting.popleft()
                queue.append((case, pool.submit(preprocess_to_file, case.images, pm, cm, dj, stems[case.name])))
            case, future = queue.popleft()
            stem = future.result()
            if on_disk:
                yield case, None, None, stem
            else:
                yield (case, *load_preprocessed(stem, remove=True), stem)


def read_ground_truth(reader, case: Case) -> Optional[np.ndarray]:
    """The case's label map as integers (uint8/uint16), or None without one."""
    if case.label is None:
        return None
    gt = reader.read_seg(case.label)[0][0]
    return np.rint(gt).astype(label_dtype(int(gt.max(initial=0))))


# ---- the two orders ------------------------------------------------------------------------------------------------
def ensembles(predictor, weights: Weights, labels: Sequence[str], cases: Sequence[Case], scratch: Scratch,
              workers: int = 0, ignore: Optional[int] = None, verbose: bool = False,
              log: Callable[[str], None] = print) -> Iterator[Finished]:
    """Every case with all ``labels`` (models, in weights' order) added, in case order, in the order of work that
    the weights allow (see the module docstring)."""
    order = case_by_case if weights.resident else model_by_model
    if verbose:
        log(f"predict: {weights.describe()}")
    yield from order(predictor, weights, labels, cases, scratch, workers, ignore, verbose, log)


def new_ensemble(predictor, scratch: Scratch, case: Case) -> uncertainty.RunningEnsemble:
    lm = predictor.label_manager
    maps = LabelMaps(os.path.join(scratch.case(case.name), "maps.raw"), label_dtype(max(lm.all_labels)))
    return uncertainty.RunningEnsemble(regions=lm.has_regions, maps=maps)


def add_model(predictor, weights, k, label, case, data, props, ens, gt, cal, ignore, verbose, log) -> None:
    start = time.perf_counter()
    probs, seg = predict_model(predictor, weights, k, label, case.name, data, props)
    t = getattr(predictor, "varaug_temperature", None)  # predict --temperature (issue 19): softmax(z / T)
    if t and t != 1.0:
        if cal is not None:  # before scaling, for the report's before/after
            add_calibration(cal, f"{label} (T=1)", probs, gt, ignore, props["spacing"])
        probs = temperature.scale(probs, t)  # the argmax, so seg, is unchanged
    if cal is not None:
        add_calibration(cal, label, probs, gt, ignore, props["spacing"])
    ens.add(probs, seg, own=True)
    del probs, seg
    if verbose:
        log(f"predict: {case.name}: {label} in {time.perf_counter() - start:.1f} s")


def case_by_case(predictor, weights, labels, cases, scratch, workers, ignore, verbose, log) -> Iterator[Finished]:
    reader = predictor.plans_manager.image_reader_writer_class()
    for case, data, props, _ in preprocessed(predictor, cases, scratch, workers, verbose):
        gt = read_ground_truth(reader, case)
        cal = None if gt is None else calibration.CalibrationCounts(predictor.label_manager.all_labels)
        ens = new_ensemble(predictor, scratch, case)
        for k, label in enumerate(labels):
            add_model(predictor, weights, k, label, case, data, props, ens, gt, cal, ignore, verbose, log)
        del data
        yield Finished(case, ens, props, gt, cal)


def model_by_model(predictor, weights, labels, cases, scratch, workers, ignore, verbose, log) -> Iterator[Finished]:
    reader = predictor.plans_manager.image_reader_writer_class()
    for start in range(0, len(cases), CASES_PER_BATCH):
        batch = list(cases[start:start + CASES_PER_BATCH])
        stems = {c.name: stem for c, _, _, stem in preprocessed(predictor, batch, scratch, workers, verbose, True)}
        state: Dict[str, list] = {}
        for k, label in enumerate(labels):
            for case in batch:
                data, props = load_preprocessed(stems[case.name])
                if case.name not in state:
                    gt = read_ground_truth(reader, case)
                    cal = None if gt is None else calibration.CalibrationCounts(predictor.label_manager.all_labels)
                    state[case.name] = [new_ensemble(predictor, scratch, case), props, gt, cal]
                ens, _, gt, cal = state[case.name]
                park(ens, scratch, case, load=True)
                add_model(predictor, weights, k, label, case, data, props, ens, gt, cal, ignore, verbose, log)
                del data
                park(ens, scratch, case)
        for case in batch:
            ens, props, gt, cal = state.pop(case.name)
            park(ens, scratch, case, load=True)
            for ext in (".npy", ".pkl"):
                os.remove(stems[case.name] + ext)
            yield Finished(case, ens, props, gt, cal)


def park(ens: uncertainty.RunningEnsemble, scratch: Scratch, case: Case, load: bool = False) -> None:
    """Move a case's running sums to the scratch folder (``load``: back into memory)."""
    folder = scratch.case(case.name)
    paths = os.path.join(folder, "sum.npy"), os.path.join(folder, "entropy.npy")
    if load:
        if ens.sum is None and os.path.exists(paths[0]):
            ens.sum, ens.entropy_sum = np.load(paths[0]), np.load(paths[1])
            for p in paths:
                os.remove(p)
    elif ens.sum is not None:
        np.save(paths[0], ens.sum)
        np.save(paths[1], ens.entropy_sum)
        ens.sum = ens.entropy_sum = None
