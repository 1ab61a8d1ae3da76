"""The stage machine of ``nnunet_varaug benchmark``: what each stage runs, when it is complete, and the state file.

Each stage is a subprocess of nnU-Net's or this plugin's own command line, run by
:func:`nnunet_varaug.runner.run_logged` with its output in ``OUT/logs/<stage>.log``; trainings are the same
``nnUNetv2_train`` jobs ``replicas`` runs (:func:`nnunet_varaug.runner.train_job`). A stage is complete when its
outputs are on disk and made from the current inputs (checkpoints and sample sets judged by sha256), so an
interrupted benchmark continues where it stopped. ``OUT/benchmark_state.json`` (written atomically) holds the
settings and, per stage, its status and compute seconds summed over attempts. Every path comes from
:class:`nnunet_varaug.experiment.Experiment` and :mod:`nnunet_varaug.sampleset`.
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

from nnunet_varaug import sampleset
from nnunet_varaug.benchmark.task import MsdTask, check_dataset_id, nii_files
from nnunet_varaug.errors import VarAugError
from nnunet_varaug.experiment import Experiment
from nnunet_varaug.fileio import file_sha256, write_json
from nnunet_varaug.runner import nnunet_command, plugin_env, run_logged, train_job

STAGES = ("convert", "plan_preprocess", "baseline", "replicas", "samples", "varaug", "evaluate", "analyze")
# what each stage needs on disk before it can run
REQUIRES: Dict[str, Sequence[str]] = {
    "convert": (), "plan_preprocess": ("convert",), "baseline": ("plan_preprocess",),
    "replicas": ("plan_preprocess",), "samples": ("replicas",), "varaug": ("samples",),
    "evaluate": ("baseline", "replicas", "varaug"), "analyze": ("replicas",),
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


class Benchmark:
    """One benchmark: a task, its settings, the output folder and the state of every stage."""

    def __init__(self, task: MsdTask, out: str, dataset_id: Optional[int] = None, configuration: str = "3d_fullres",
                 fold: str = "0", num_replicas: int = 5, base: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                 planner: str = "ExperimentPlanner", device: str = "cuda", num_processes: Optional[int] = None,
                 p: Optional[int] = None, devices: Optional[str] = None) -> None:
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
        self.state_path = os.path.join(self.out, STATE_FILE)
        self.state = self._load_state()

    # ---- settings and state -----------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return {"msd": self.task.folder, "dataset_id": self.dataset_id, "configuration": self.configuration,
                "fold": self.fold, "num_replicas": self.num_replicas, "base": self.base, "plans": self.plans,
                "varaug_trainer": self.varaug_trainer}

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
        from nnunet_varaug.benchmark.results import write_results

        return write_results(self)

    # ---- names ------------------------------------------------------------------------------------------------
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
    def _trained(self, trainer: str) -> bool:
        return (self.layout.replica_state(trainer) == "finished"
                and os.path.isfile(os.path.join(self.fold_folder(trainer), "validation", "summary.json")))

    def done(self, stage: str) -> bool:
        if stage == "convert":
            return (os.path.isfile(os.path.join(self.raw_folder, "dataset.json"))
                    and len(nii_files(os.path.join(self.raw_folder, "labelsTr"))) == len(self.task.training_cases))
        if stage == "plan_preprocess":
            return self._preprocessed()
        if stage == "baseline":
            return self._trained(self.base)
        if stage == "replicas":
            return all(self._trained(n) for n in self.replica_names)
        if stage == "samples":
            return self._samples_current()
        if stage == "varaug":
            return self._trained(self.varaug_trainer)
        if stage == "evaluate":
            path = os.path.join(self.out, "evaluation", "dice.json")
            if not os.path.isfile(path):
                return False
            with open(path) as f:
                return json.load(f).get("inputs") == self.evaluation_inputs()
        if stage == "analyze":
            return os.path.isfile(os.path.join(self.out, "analysis", "report.html"))
        raise ValueError(stage)

    def _samples_current(self) -> bool:
        """A complete sample set made by exactly the current checkpoints of the replicas (sha256)."""
        try:
            manifest = sampleset.read_manifest(self.layout.samples_folder)
        except VarAugError:
            return False
        if manifest is None:
            return False
        listed = manifest.get("replicas") or []
        if [r.get("name") for r in listed] != self.replica_names:
            return False
        return all(os.path.isfile(self.layout.final_checkpoint(r["name"]))
                   and r.get("sha256") == file_sha256(self.layout.final_checkpoint(r["name"])) for r in listed)

    def _preprocessed(self) -> bool:
        layout = self.layout
        if not os.path.isfile(layout.plans_file):
            return False
        configurations = layout.plans_json["configurations"]
        if self.configuration not in configurations:
            raise VarAugError(f"configuration '{self.configuration}' is not in {layout.plans_file} (nnU-Net planned: "
                              f"{', '.join(sorted(configurations))}): pass one of them with -c")
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = layout.preprocessed_folder
        if not os.path.isdir(folder):
            return False
        cases = infer_dataset_class(folder).get_identifiers(folder)
        gt = os.path.join(layout.preprocessed_base, "gt_segmentations")
        return len(cases) == len(self.task.training_cases) and os.path.isdir(gt) and \
            len(nii_files(gt)) == len(self.task.training_cases)

    def evaluation_inputs(self) -> Dict[str, Optional[str]]:
        """What the evaluation was computed from: the sha256 of every model's final checkpoint."""
        inputs = {}
        for trainer in [self.base, *self.replica_names, self.varaug_trainer]:
            path = self.layout.final_checkpoint(trainer)
            inputs[trainer] = file_sha256(path) if os.path.isfile(path) else None
        return inputs

    # ---- checks before work ----------------------------------------------------------------------------------
    def check_trainers(self) -> None:
        """The base trainer must be one nnU-Net can find; its ``_seed``/``_varaug`` names must parse."""
        from nnunet_varaug import registry

        try:
            registry.resolve(self.base)
            for name in [*self.replica_names, self.varaug_trainer]:
                registry.parse(name)
        except registry.TrainerNameError as e:
            raise VarAugError(f"unknown base trainer '{self.base}': {e}") from None

    def check_requirements(self, stage: str, planned: Sequence[str]) -> None:
        """A stage asked for before its inputs exist (and not about to be made by this run) is an error."""
        for need in REQUIRES[stage]:
            if need in planned or self.done(need):
                continue
            raise VarAugError(f"stage '{stage}' needs stage '{need}' first ({self._what(need)} not on disk): run "
                              f"`nnunet_varaug benchmark {self.flags} --stages {need}`, or leave out --stages to run "
                              f"every stage in order")

    def _what(self, stage: str) -> str:
        return {"convert": f"{self.raw_folder}", "plan_preprocess": f"plans and preprocessed {self.configuration} data",
                "baseline": f"a finished {self.base} of fold {self.fold}",
                "replicas": f"{self.num_replicas} finished replicas {self.base}_seed0..{self.num_replicas - 1}",
                "samples": "the replicas' variability samples", "varaug": f"a finished {self.varaug_trainer}",
                "evaluate": "the evaluation", "analyze": "the variability report"}[stage]

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

    def _train(self, stage: str, trainer: str) -> None:
        """``trainer`` brought to a finished, validated state: the same job ``replicas`` runs (``--c`` to
        continue, ``--val`` when only the validation predictions are missing)."""
        job = train_job(self.layout, trainer, self.device)
        self._call(stage, job.command, job.env)

    def _command(self, name: str) -> List[str]:
        """``nnunet_varaug <name>`` with this benchmark's experiment flags."""
        return nnunet_command("nnunet_varaug") + [name, *shlex.split(self.layout.flags), "-device", self.device]

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
        elif stage == "replicas":
            self._call(stage, self._command("replicas") + ([] if self.devices is None else ["--devices", self.devices]))
        elif stage == "samples":
            self._call(stage, self._command("samples"))
        elif stage == "varaug":
            self._train(stage, self.varaug_trainer)
        elif stage == "evaluate":
            from nnunet_varaug.benchmark.evaluation import evaluate

            evaluate(self)
        elif stage == "analyze":
            self._call(stage, self._command("analyze") + ["-o", os.path.join(self.out, "analysis"), "--quiet"])
        if not self.done(stage):
            raise StageFailed(f"stage '{stage}' ran but its outputs are not complete; see "
                              f"{self.stage_record(stage).get('log', 'its log')}")

    def run(self, stages: Sequence[str]) -> int:
        """Run ``stages`` in order, skipping complete ones; write results.md. Returns the exit code."""
        if "convert" in stages or not self.done("convert"):
            check_dataset_id(self.task, self.dataset_id, self.dataset)
        for i, stage in enumerate(stages):
            self.check_requirements(stage, stages[:i])
        self.check_trainers()
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
