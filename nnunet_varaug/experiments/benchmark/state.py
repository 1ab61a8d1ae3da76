"""The state of one ``nnunet_varaug benchmark``: its settings, names, the stages and what each requires, the state
file, and the calls every stage makes (logged commands, trainings).

``OUT/benchmark_state.json`` (written atomically) holds the settings, the test split and, per stage, its status and
compute seconds summed over attempts. Every path comes from :class:`nnunet_varaug.training.experiment.Experiment`.
Each stage is a subprocess of nnU-Net's or this plugin's own command line, run by
:func:`nnunet_varaug.launch.runner.run_logged` with its output in ``OUT/logs/<stage>.log``; trainings are the same
``nnUNetv2_train`` jobs ``replicas`` runs (:func:`nnunet_varaug.launch.runner.train_job`). What each stage does and
when it is complete: :mod:`nnunet_varaug.experiments.benchmark.stages`.
"""
from __future__ import annotations

import json
import os
import shlex
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.experiments.benchmark.task import MsdTask
from nnunet_varaug.launch.runner import nnunet_command, plugin_env, run_logged, train_job
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.training.outoffold import OUT_OF_FOLD, SOURCES
from nnunet_varaug.utilities import folds, names
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import file_sha256, write_json

STAGES = ("convert", "holdout", "plan_preprocess", "splits", "baseline", "replicas", "samples", "varaug", "stability",
          "evaluate", "analyze")
# what each stage needs on disk before it can run
REQUIRES: Dict[str, Sequence[str]] = {
    "convert": (), "holdout": ("convert",), "plan_preprocess": ("holdout",), "splits": ("plan_preprocess",),
    "baseline": ("splits",), "replicas": ("splits",), "samples": ("replicas",), "varaug": ("samples",),
    "stability": ("samples",), "evaluate": ("baseline", "replicas", "varaug", "stability"),
    "analyze": ("replicas",),
}
STATE_FILE = "benchmark_state.json"


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names its log."""


def fmt_seconds(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1:02:05"``; None -> ``"–"``."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def test_split_record(bench: "Benchmark") -> dict:
    """The benchmark's test split, chosen from the task's training cases by ``--test-fraction`` and
    ``--test-seed`` (deterministic), as recorded in the state: ``{"fraction", "seed", "cases"}``."""
    cases = folds.choose_test_cases(bench.task.training_cases, bench.test_fraction, bench.test_seed,
                                    min_remaining=bench.num_folds)
    return {"fraction": bench.test_fraction, "seed": bench.test_seed, "cases": cases}


class Benchmark:
    """One benchmark: a task, its settings, the output folder and the state of every stage."""

    def __init__(self, task: MsdTask, out: str, dataset_id: Optional[int] = None, configuration: str = "3d_fullres",
                 fold: str = "0", num_replicas: int = 5, base: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                 planner: str = "ExperimentPlanner", device: str = "cuda", num_processes: Optional[int] = None,
                 p: Optional[int] = None, devices: Optional[str] = None, test_fraction: float = 0.2,
                 test_seed: int = 0, num_folds: int = 5, sources: Sequence[str] = ("in-fold",),
                 stability: bool = False) -> None:
        self.task = task
        self.out = os.path.abspath(out)
        self.dataset_id = int(dataset_id) if dataset_id is not None else task.task_id
        if not 1 <= self.dataset_id <= 999:
            raise VarAugError(f"dataset id must be within 1..999, got {self.dataset_id}: pass -d with a free id")
        self.configuration = configuration
        self.fold = str(fold)
        self.num_replicas = int(num_replicas)
        if self.num_replicas < 2:
            raise VarAugError(f"-n must be at least 2 (replicas to compare and to vote), got {num_replicas}")
        self.base = base
        self.plans = plans
        self.planner = planner
        self.device = device
        self.num_processes = num_processes
        self.devices = devices
        if p is not None and not 0 <= int(p) <= 100:
            raise VarAugError(f"--varaug-p is a percentage 0..100, got {p}")
        self.p = None if p is None else int(p)
        self.test_fraction = float(test_fraction)
        self.test_seed = int(test_seed)
        self.num_folds = int(num_folds)
        if self.num_folds < 2:
            raise VarAugError(f"--folds must be at least 2 (a cross-validation), got {num_folds}")
        if not 0 <= int(self.fold) < self.num_folds:
            raise VarAugError(f"-f {fold} is not one of the {self.num_folds} folds (--folds {self.num_folds})")
        unknown = [x for x in sources if x not in SOURCES]
        if unknown or not sources:
            raise VarAugError(f"--sources takes {' and/or '.join(SOURCES)}, got {' '.join(sources) or 'nothing'}")
        self.sources = [x for x in SOURCES if x in sources]
        self.stability = bool(stability)
        self.state_path = os.path.join(self.out, STATE_FILE)
        self.state = self.load_state()
        split = test_split_record(self)
        if self.state.get("test_split", split) != split:
            raise VarAugError(f"{self.state_path} records another test split than --test-fraction/--test-seed give: "
                              f"use another -o")
        self.state["test_split"] = split

    # ---- settings and state -----------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return {"msd": self.task.folder, "dataset_id": self.dataset_id, "configuration": self.configuration,
                "fold": self.fold, "num_replicas": self.num_replicas, "base": self.base, "plans": self.plans,
                "varaug_trainers": self.varaug_trainers, "test_fraction": self.test_fraction,
                "test_seed": self.test_seed, "folds": self.num_folds, "sources": self.sources,
                "stability": self.stability}

    def load_state(self) -> dict:
        if not os.path.isfile(self.state_path):
            return {"settings": self.settings, "stages": {}}
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise VarAugError(f"{self.state_path} is not readable ({e}): remove it (the stages' outputs stay; they "
                              f"are found again) or use another -o") from None
        old = {k: v for k, v in state.get("settings", {}).items() if k != "msd"}
        new = {k: v for k, v in self.settings.items() if k != "msd"}
        if old != new:
            diff = ", ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k])
            raise VarAugError(f"{self.out} holds a benchmark with other settings ({diff}); use another -o for "
                              f"these settings, or the same flags as before to continue it")
        state["settings"] = self.settings
        return state

    def save_state(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        write_json(self.state_path, self.state)

    def stage_record(self, stage: str) -> dict:
        return self.state["stages"].setdefault(stage, {"status": "pending", "seconds": None, "attempts": 0})

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def test_cases(self) -> List[str]:
        """The held-out test split (recorded in the state; never planned, trained, validated or sampled on)."""
        return list(self.state["test_split"]["cases"])

    def varaug_for(self, source: str) -> str:
        """The variability-augmented trainer of ``source``: ``<BASE>_varaug[_pNN]`` or ``…_oof``."""
        return names.varaug_name(self.base, self.p, source)

    @property
    def varaug_trainers(self) -> List[str]:
        return [self.varaug_for(x) for x in self.sources]

    def stability_names(self, source: str) -> List[str]:
        """``--stability``: K seed replicas of the source's varaug trainer, ``<varaug>_seed0…K-1``."""
        return [names.replica_name(self.varaug_for(source), "seed", k) for k in range(self.num_replicas)]

    @property
    def all_stability_names(self) -> List[str]:
        return [n for x in self.sources for n in self.stability_names(x)] if self.stability else []

    @property
    def replica_folds(self) -> List[int]:
        """The folds whose K replicas are trained: the benchmark's fold, and every fold for out-of-fold samples."""
        return list(range(self.num_folds)) if OUT_OF_FOLD in self.sources else [int(self.fold)]

    def fold_layout(self, fold) -> Experiment:
        return Experiment(self.dataset, self.configuration, int(fold), self.num_replicas, self.base, "seed",
                          self.plans)

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.task.name}"

    @property
    def raw_folder(self) -> str:
        return os.path.join(os.environ["nnUNet_raw"], self.dataset)

    def experiment(self) -> Experiment:
        """The replica experiment, checked (its plans and preprocessed data must exist)."""
        return Experiment.from_args(self.dataset_id, self.configuration, self.fold, self.num_replicas, self.base,
                                    "seed", self.plans)

    @property
    def layout(self) -> Experiment:
        """The replica experiment's names and folders, unchecked (its inputs may not exist yet)."""
        return Experiment(self.dataset, self.configuration, self.fold, self.num_replicas, self.base, "seed", self.plans)

    @property
    def preprocessed_base(self) -> str:
        return self.layout.preprocessed_base

    def fold_folder(self, trainer: str) -> str:
        return self.layout.fold_folder(trainer)

    @property
    def replica_names(self) -> List[str]:
        return self.layout.replica_names

    @property
    def flags(self) -> str:
        """The flags of this benchmark, for messages."""
        extra = "" if self.dataset_id == self.task.task_id else f" -d {self.dataset_id}"
        return (f"--msd {shlex.quote(self.task.folder)}{extra} -c {self.configuration} -f {self.fold} "
                f"-n {self.num_replicas} -tr {self.base} -o {shlex.quote(self.out)}")

    # ---- completion of trainings and what the evaluation used ---------------------------------------------------
    def trained(self, trainer: str, fold=None) -> bool:
        layout = self.layout if fold is None else self.fold_layout(fold)
        return (layout.replica_state(trainer) == "finished"
                and os.path.isfile(os.path.join(layout.fold_folder(trainer), "validation", "summary.json")))

    def evaluation_inputs(self) -> Dict[str, Optional[str]]:
        """What the evaluation was computed from: the sha256 of every model's final checkpoint."""
        inputs = {}
        for trainer in [self.base, *self.replica_names, *self.varaug_trainers, *self.all_stability_names]:
            path = self.layout.final_checkpoint(trainer)
            inputs[trainer] = file_sha256(path) if os.path.isfile(path) else None
        return inputs

    # ---- running -----------------------------------------------------------------------------------------------
    def log(self, stage: str, command: Sequence[str]) -> str:
        """The stage's log path, with the command recorded in the state."""
        log_path = os.path.join(self.out, "logs", f"{stage}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        record = self.stage_record(stage)
        record.setdefault("commands", [])
        if shlex.join(command) not in record["commands"]:
            record["commands"].append(shlex.join(command))
        record["log"] = log_path
        print(f"    $ {shlex.join(command)}", flush=True)
        return log_path

    def call(self, stage: str, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log_path = self.log(stage, command)
        code = run_logged(command, log_path, env or plugin_env(), f"benchmark stage {stage}")
        if code != 0:
            raise StageFailed(f"stage '{stage}' failed: `{shlex.join(command)}` exited {code}; see {log_path}. "
                              f"Rerun the same command to retry it (finished stages are skipped)")

    def train(self, stage: str, trainer: str, fold=None) -> None:
        """``trainer`` brought to a finished, validated state: the same job ``replicas`` runs (``--c`` to
        continue, ``--val`` when only the validation predictions are missing)."""
        job = train_job(self.layout if fold is None else self.fold_layout(fold), trainer, self.device)
        self.call(stage, job.command, job.env)

    def command(self, name: str, layout: Optional[Experiment] = None) -> List[str]:
        """``nnunet_varaug <name>`` with this benchmark's experiment flags (or ``layout``'s)."""
        return nnunet_command("nnunet_varaug") + [name, *shlex.split((layout or self.layout).flags), "-device",
                                                  self.device]

    def device_flags(self) -> List[str]:
        return [] if self.devices is None else ["--devices", self.devices]

    @property
    def stages(self) -> List[str]:
        """This benchmark's stages: ``stability`` only with ``--stability``."""
        return [s for s in STAGES if s != "stability" or self.stability]
