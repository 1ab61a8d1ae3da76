"""The stage machine of ``nnunet_varaug benchmark``: what each stage runs, when it is complete, and the state file.

Each stage is a subprocess of nnU-Net's or this plugin's own command line, run by
:func:`nnunet_varaug.launch.runner.run_logged` with its output in ``OUT/logs/<stage>.log``; trainings are the same
``nnUNetv2_train`` jobs ``replicas`` runs (:func:`nnunet_varaug.launch.runner.train_job`). A stage is complete when its
outputs are on disk and made from the current inputs (checkpoints and sample sets judged by sha256), so an
interrupted benchmark continues where it stopped. ``OUT/benchmark_state.json`` (written atomically) holds the
settings and, per stage, its status and compute seconds summed over attempts. Every path comes from
:class:`nnunet_varaug.training.experiment.Experiment` and :mod:`nnunet_varaug.training.sampleset`.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.experiments.benchmark.task import MsdTask, check_dataset_id, nii_files
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.fileio import file_sha256, write_json
from nnunet_varaug.launch.runner import nnunet_command, plugin_env, run_logged, train_job

STAGES = ("convert", "holdout", "plan_preprocess", "splits", "baseline", "replicas", "samples", "varaug", "stability",
          "evaluate", "analyze")
# what each stage needs on disk before it can run
REQUIRES: Dict[str, Sequence[str]] = {
    "convert": (), "holdout": ("convert",), "plan_preprocess": ("holdout",), "splits": ("plan_preprocess",),
    "baseline": ("splits",), "replicas": ("splits",), "samples": ("replicas",), "varaug": ("samples",),
    "stability": ("samples",), "evaluate": ("baseline", "replicas", "varaug", "stability"),
    "analyze": ("replicas",),
}
SOURCES = ("in-fold", "out-of-fold")
STATE_FILE = "benchmark_state.json"


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names its log."""


def fmt_seconds(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1:02:05"``; None -> ``"–"``."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
        self.varaug_trainer = f"{base}_varaug" if p is None else f"{base}_varaug_p{int(p)}"
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
        self.state = self._load_state()
        from nnunet_varaug.experiments.benchmark.holdout import test_split_record

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

    def _load_state(self) -> dict:
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

    def write_results(self) -> str:
        from nnunet_varaug.experiments.benchmark.results import write_results

        return write_results(self)

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def test_cases(self) -> List[str]:
        """The held-out test split (recorded in the state; never planned, trained, validated or sampled on)."""
        return list(self.state["test_split"]["cases"])

    def varaug_for(self, source: str) -> str:
        """The variability-augmented trainer of ``source``: ``<BASE>_varaug[_pNN]`` or ``…_oof``."""
        return self.varaug_trainer + ("_oof" if source == "out-of-fold" else "")

    @property
    def varaug_trainers(self) -> List[str]:
        return [self.varaug_for(x) for x in self.sources]

    def stability_names(self, source: str) -> List[str]:
        """``--stability``: K seed replicas of the source's varaug trainer, ``<varaug>_seed0…K-1``."""
        from nnunet_varaug.utilities import names

        return [names.replica_name(self.varaug_for(source), "seed", k) for k in range(self.num_replicas)]

    @property
    def all_stability_names(self) -> List[str]:
        return [n for x in self.sources for n in self.stability_names(x)] if self.stability else []

    @property
    def replica_folds(self) -> List[int]:
        """The folds whose K replicas are trained: the benchmark's fold, and every fold for out-of-fold samples."""
        return list(range(self.num_folds)) if "out-of-fold" in self.sources else [int(self.fold)]

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

    # ---- completion checks (the truth is on disk) -------------------------------------------------------------
    def _trained(self, trainer: str, fold=None) -> bool:
        layout = self.layout if fold is None else self.fold_layout(fold)
        return (layout.replica_state(trainer) == "finished"
                and os.path.isfile(os.path.join(layout.fold_folder(trainer), "validation", "summary.json")))

    def done(self, stage: str) -> bool:
        from nnunet_varaug.experiments.benchmark import holdout

        if stage == "convert":
            held = os.path.join(self.raw_folder, holdout.HELD_OUT_LABELS)
            return (os.path.isfile(os.path.join(self.raw_folder, "dataset.json"))
                    and len(nii_files(os.path.join(self.raw_folder, "labelsTr")))
                    + (len(nii_files(held)) if os.path.isdir(held) else 0) == len(self.task.training_cases))
        if stage == "holdout":
            return holdout.holdout_done(self)
        if stage == "plan_preprocess":
            return self._preprocessed()
        if stage == "splits":
            return holdout.splits_done(self)
        if stage == "baseline":
            return self._trained(self.base)
        if stage == "replicas":
            return all(self._trained(n, f) for f in self.replica_folds for n in self.replica_names)
        if stage == "samples":
            return all(self._samples_current(x) for x in self.sources)
        if stage == "varaug":
            return all(self._trained(t) for t in self.varaug_trainers)
        if stage == "stability":
            return all(self._trained(t) for t in self.all_stability_names)
        if stage == "evaluate":
            path = os.path.join(self.out, "evaluation", "dice.json")
            if not os.path.isfile(path):
                return False
            with open(path) as f:
                return json.load(f).get("inputs") == self.evaluation_inputs()
        if stage == "analyze":
            return os.path.isfile(os.path.join(self.out, "analysis", "report.html"))
        raise ValueError(stage)

    def _samples_current(self, source: str = "in-fold") -> bool:
        from nnunet_varaug.experiments.benchmark.variants import samples_current

        return samples_current(self, source)

    def _preprocessed(self) -> bool:
        from nnunet_varaug.experiments.benchmark.holdout import preprocessed_done

        return preprocessed_done(self)

    def evaluation_inputs(self) -> Dict[str, Optional[str]]:
        """What the evaluation was computed from: the sha256 of every model's final checkpoint."""
        inputs = {}
        for trainer in [self.base, *self.replica_names, *self.varaug_trainers, *self.all_stability_names]:
            path = self.layout.final_checkpoint(trainer)
            inputs[trainer] = file_sha256(path) if os.path.isfile(path) else None
        return inputs

    # ---- running -----------------------------------------------------------------------------------------------
    def _log(self, stage: str, command: Sequence[str]) -> str:
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

    def _call(self, stage: str, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log_path = self._log(stage, command)
        code = run_logged(command, log_path, env or plugin_env(), f"benchmark stage {stage}")
        if code != 0:
            raise StageFailed(f"stage '{stage}' failed: `{shlex.join(command)}` exited {code}; see {log_path}. "
                              f"Rerun the same command to retry it (finished stages are skipped)")

    def _train(self, stage: str, trainer: str, fold=None) -> None:
        """``trainer`` brought to a finished, validated state: the same job ``replicas`` runs (``--c`` to
        continue, ``--val`` when only the validation predictions are missing)."""
        job = train_job(self.layout if fold is None else self.fold_layout(fold), trainer, self.device)
        self._call(stage, job.command, job.env)

    def _command(self, name: str, layout: Optional[Experiment] = None) -> List[str]:
        """``nnunet_varaug <name>`` with this benchmark's experiment flags (or ``layout``'s)."""
        return nnunet_command("nnunet_varaug") + [name, *shlex.split((layout or self.layout).flags), "-device",
                                                  self.device]

    def _devices(self) -> List[str]:
        return [] if self.devices is None else ["--devices", self.devices]

    def run_stage(self, stage: str) -> None:
        np_flag = [] if self.num_processes is None else ["-np", str(self.num_processes)]
        if stage == "convert":
            if os.path.isdir(self.raw_folder):  # dataset.json is the converter's last write: this is a partial one
                if self.stage_record("convert").get("attempts", 0) == 0:
                    raise VarAugError(f"{self.raw_folder} exists without dataset.json (an interrupted conversion "
                                      f"not made by this benchmark?): remove it and rerun")
                shutil.rmtree(self.raw_folder)
            self._call(stage, nnunet_command("nnUNetv2_convert_MSD_dataset")
                       + ["-i", self.task.folder, "-overwrite_id", str(self.dataset_id)] + np_flag)
        elif stage == "holdout":
            from nnunet_varaug.experiments.benchmark.holdout import run_holdout

            run_holdout(self)
        elif stage == "splits":
            from nnunet_varaug.experiments.benchmark.holdout import run_splits

            run_splits(self)
        elif stage == "plan_preprocess":
            env = plugin_env()
            if env.get("nnUNet_n_proc_DA", "") == "0":  # nnU-Net's planner fails with 0 augmentation workers
                env["nnUNet_n_proc_DA"] = "1"
            self._call(stage, nnunet_command("nnUNetv2_plan_and_preprocess")
                       + ["-d", str(self.dataset_id), "-c", self.configuration, "-pl", self.planner,
                          "--verify_dataset_integrity"] + np_flag
                       + ([] if self.num_processes is None else ["-npfp", str(self.num_processes)]), env)
        elif stage == "baseline":
            self._train(stage, self.base)
        elif stage in ("replicas", "samples", "varaug", "stability"):
            from nnunet_varaug.experiments.benchmark import variants

            getattr(variants, f"run_{stage}")(self)
        elif stage == "evaluate":
            from nnunet_varaug.experiments.benchmark.evaluation import evaluate

            evaluate(self)
        elif stage == "analyze":  # the replicas' variability on the held-out test split
            from nnunet_varaug.experiments.benchmark.holdout import HELD_OUT_IMAGES, HELD_OUT_LABELS

            self._call(stage, self._command("analyze") + [
                "-i", os.path.join(self.raw_folder, HELD_OUT_IMAGES),
                "-l", os.path.join(self.raw_folder, HELD_OUT_LABELS),
                "-o", os.path.join(self.out, "analysis"), "--quiet"])
        if not self.done(stage):
            raise StageFailed(f"stage '{stage}' ran but its outputs are not complete; see "
                              f"{self.stage_record(stage).get('log', 'its log')}")

    @property
    def stages(self) -> List[str]:
        """This benchmark's stages: ``stability`` only with ``--stability``."""
        return [s for s in STAGES if s != "stability" or self.stability]

    def run(self, stages: Sequence[str]) -> int:
        """Run ``stages`` in order, skipping complete ones; write results.md. Returns the exit code."""
        stages = [s for s in stages if s in self.stages]
        if "convert" in stages or not self.done("convert"):
            check_dataset_id(self.task, self.dataset_id, self.dataset)
        from nnunet_varaug.experiments.benchmark.checks import check_requirements, check_trainers

        for i, stage in enumerate(stages):
            check_requirements(self, stage, stages[:i])
        check_trainers(self)
        code = 0
        for i, stage in enumerate(stages, 1):
            record = self.stage_record(stage)
            label = f"[{i}/{len(stages)}] {stage}"
            if self.done(stage):
                if record["status"] != "done":
                    record.update(status="done")
                    if not record.get("attempts"):
                        record["note"] = "found complete on disk"
                    self.save_state()
                print(f"{label}: complete, skipped", flush=True)
                continue
            print(f"{label}: running", flush=True)
            record.update(status="running", attempts=record.get("attempts", 0) + 1)
            self.save_state()
            start = time.monotonic()
            try:
                self.run_stage(stage)
            except (StageFailed, VarAugError, KeyboardInterrupt) as e:
                record.update(status="failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                              seconds=(record.get("seconds") or 0.0) + time.monotonic() - start)
                self.save_state()
                self.write_results()
                if isinstance(e, KeyboardInterrupt):
                    raise
                print(f"nnunet_varaug benchmark: {e}", file=sys.stderr)
                code = 1 if isinstance(e, StageFailed) else 2
                break
            record.update(status="done", seconds=(record.get("seconds") or 0.0) + time.monotonic() - start,
                          finished=datetime.datetime.now().isoformat(timespec="seconds"))
            record.pop("note", None)
            self.save_state()
            print(f"{label}: done in {fmt_seconds(time.monotonic() - start)}", flush=True)
        path = self.write_results()
        print(f"results: {path}")
        return code
