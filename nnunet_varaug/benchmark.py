"""``nnunet_varaug benchmark``: the whole plugin on a Medical Segmentation Decathlon task, stage by stage.

A Decathlon task folder (``TaskNN_Name`` with imagesTr, labelsTr, imagesTs, dataset.json) goes through::

    convert          nnUNetv2_convert_MSD_dataset                -> $nnUNet_raw/DatasetNNN_Name
    plan_preprocess  nnUNetv2_plan_and_preprocess -c C           -> plans, preprocessed data
    baseline         nnUNetv2_train … -tr BASE                   -> plain nnU-Net, fold F
    replicas         nnunet_varaug replicas -n K                 -> BASE_seed0 … BASE_seed<K-1>
    samples          nnunet_varaug samples -n K                  -> their label maps of the training cases
    varaug           nnUNetv2_train … -tr BASE_varaug            -> nnU-Net trained with those samples
    evaluate         nnU-Net's compute_metrics_on_folder         -> per-label Dice on fold F's validation cases of
                                                                    baseline, each replica, their majority vote, varaug
    analyze          nnunet_varaug analyze -n K -o OUT/analysis  -> the variability report

Every step is a subprocess of nnU-Net's or this plugin's own command line (nothing is re-implemented), with its
output in ``OUT/logs/<stage>.log``. A stage is skipped when its outputs are on disk, so an interrupted benchmark
continues where it stopped (trainings continue from ``checkpoint_latest.pth``). ``OUT/benchmark_state.json``
(written atomically) holds the settings and, per stage, its status and compute seconds (summed over attempts);
``OUT/results.md`` puts the Dice of every model next to nnU-Net's published numbers for the task, with the
compute time of every stage.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from nnunet_varaug.fileio import write_text
from nnunet_varaug.experiment import Experiment, VarAugError, dataset_id_of, require_env
from nnunet_varaug.launch import nnunet_command, plugin_env

STAGES = ("convert", "plan_preprocess", "baseline", "replicas", "samples", "varaug", "evaluate", "analyze")
# what each stage needs on disk before it can run
REQUIRES: Dict[str, Sequence[str]] = {
    "convert": (), "plan_preprocess": ("convert",), "baseline": ("plan_preprocess",),
    "replicas": ("plan_preprocess",), "samples": ("replicas",), "varaug": ("samples",),
    "evaluate": ("baseline", "replicas", "varaug"), "analyze": ("replicas",),
}
STATE_FILE = "benchmark_state.json"
MSD_KEYS = ("modality", "labels", "numTraining", "training")

# nnU-Net's published Dice for Decathlon tasks, by label name (lower case). These are MSD *test-set* results of
# nnU-Net (an ensemble chosen by 5-fold cross-validation, evaluated by the challenge), not fold validation of one
# model; docs/benchmark.md says where each number comes from.
PUBLISHED_DICE: Dict[str, dict] = {
    "Task02_Heart": {
        "dice": {"left atrium": 0.93},
        "source": "Isensee et al., nnU-Net: Self-adapting Framework for U-Net-Based Medical Image Segmentation, "
                  "arXiv:1809.10486 (2018), Table 2: Medical Segmentation Decathlon test set",
    },
    "Task04_Hippocampus": {
        "dice": {"anterior": 0.90, "posterior": 0.89},
        "source": "Isensee et al., nnU-Net: Self-adapting Framework for U-Net-Based Medical Image Segmentation, "
                  "arXiv:1809.10486 (2018), Table 2: Medical Segmentation Decathlon test set",
    },
}


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names its log."""


# ---- the Decathlon task folder --------------------------------------------------------------------------------------
@dataclass
class MsdTask:
    """A Decathlon task folder, checked: ``TaskNN_Name`` with the layout and dataset.json the converter needs."""

    folder: str
    task_id: int
    name: str
    dataset_json: dict

    @property
    def folder_name(self) -> str:
        return os.path.basename(self.folder)

    @property
    def training_cases(self) -> List[str]:
        return sorted(os.path.basename(e["label"])[: -len(".nii.gz")] for e in self.dataset_json["training"])

    @property
    def label_names(self) -> Dict[int, str]:
        return {int(k): v for k, v in self.dataset_json["labels"].items()}


def _nii_files(folder: str) -> List[str]:
    """NIfTI files as nnU-Net's converter lists them (hidden and AppleDouble ``._`` files left out)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz") and not f.startswith((".", "_")))


def read_msd_task(folder: str) -> MsdTask:
    """Check a Decathlon task folder before anything is converted; every error says what to fix.

    Raises:
        VarAugError: wrong folder name, missing subfolder or dataset.json, missing keys, listed files absent.
    """
    folder = os.path.abspath(folder.rstrip("/\\"))
    name = os.path.basename(folder)
    how = ("download and extract the task from http://medicaldecathlon.com (e.g. Task04_Hippocampus.tar) and pass "
           "the folder that holds imagesTr, labelsTr, imagesTs and dataset.json")
    if not os.path.isdir(folder):
        raise VarAugError(f"--msd {folder} is not a folder: {how}")
    m = re.fullmatch(r"Task(\d+)_([A-Za-z0-9]+)", name)
    if m is None:
        raise VarAugError(f"--msd folder '{name}' is not named like a Decathlon task 'TaskNN_Name' (e.g. "
                          f"Task04_Hippocampus, exactly one underscore): nnU-Net's converter takes the dataset id "
                          f"and name from it; rename the folder")
    missing = [s for s in ("imagesTr", "labelsTr", "imagesTs") if not os.path.isdir(os.path.join(folder, s))]
    if missing:
        nested = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d, "imagesTr"))]
        hint = f" (it holds {nested[0]}/: pass --msd {os.path.join(folder, nested[0])})" if nested else ""
        raise VarAugError(f"{folder} is not a Decathlon task folder: {', '.join(missing)} missing{hint}; {how}")
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise VarAugError(f"{path} is missing; {how}")
    try:
        with open(path) as f:
            dataset = json.load(f)
    except (OSError, ValueError) as e:
        raise VarAugError(f"{path} is not readable JSON ({e}); extract the task again") from None
    absent = [k for k in MSD_KEYS if k not in dataset]
    if absent:
        raise VarAugError(f"{path} lacks the Decathlon key(s) {', '.join(absent)} (a Decathlon dataset.json has "
                          f"'modality', 'labels' (index -> name), 'numTraining', 'training' and 'test'); this looks "
                          f"like {'an nnU-Net v2 dataset.json: use it with nnUNetv2_plan_and_preprocess directly' if 'channel_names' in dataset else 'a damaged file: extract the task again'}")
    labels = dataset["labels"]
    if not isinstance(labels, dict) or not all(str(k).isdigit() for k in labels) or "0" not in labels:
        raise VarAugError(f"{path}: 'labels' must map label values to names with '0' for background, e.g. "
                          f'{{"0": "background", "1": "Anterior"}}; got {labels}')
    training = dataset["training"]
    if not isinstance(training, list) or not training or not all(
            isinstance(e, dict) and "image" in e and "label" in e for e in training):
        raise VarAugError(f"{path}: 'training' must be a non-empty list of {{\"image\": …, \"label\": …}} entries")
    if int(dataset["numTraining"]) != len(training):
        raise VarAugError(f"{path}: numTraining is {dataset['numTraining']} but 'training' lists {len(training)} "
                          f"cases; fix numTraining or extract the task again")
    absent_files = [e[k] for e in training for k in ("image", "label")
                    if not os.path.isfile(os.path.join(folder, e[k]))]
    if absent_files:
        raise VarAugError(f"{len(absent_files)} file(s) listed in {path} are missing, e.g. {absent_files[0]}: "
                          f"the download is incomplete; extract the task again")
    labels_on_disk = _nii_files(os.path.join(folder, "labelsTr"))
    if len(labels_on_disk) != len(training):
        raise VarAugError(f"{folder}/labelsTr holds {len(labels_on_disk)} label files but dataset.json lists "
                          f"{len(training)} training cases; remove stray files or extract the task again")
    return MsdTask(folder, int(m.group(1)), m.group(2), dataset)


# ---- the benchmark ----------------------------------------------------------------------------------------------------
def _fmt_seconds(seconds: Optional[float]) -> str:
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
        write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def stage_record(self, stage: str) -> dict:
        return self.state["stages"].setdefault(stage, {"status": "pending", "seconds": None, "attempts": 0})

    # ---- names ------------------------------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.task.name}"

    @property
    def raw_folder(self) -> str:
        return os.path.join(os.environ["nnUNet_raw"], self.dataset)

    @property
    def preprocessed_base(self) -> str:
        return os.path.join(os.environ["nnUNet_preprocessed"], self.dataset)

    def experiment(self) -> Experiment:
        return Experiment.from_args(self.dataset_id, self.configuration, self.fold, self.num_replicas, self.base,
                                    "seed", self.plans)

    @property
    def layout(self) -> Experiment:
        """The replica experiment's names and folders, unchecked (its inputs may not exist yet)."""
        return Experiment(self.dataset, self.configuration, self.fold, self.num_replicas, self.base, "seed", self.plans)

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

    @property
    def experiment_flags(self) -> str:
        extra = "" if self.plans == "nnUNetPlans" else f" -p {self.plans}"
        return f"-d {self.dataset_id} -c {self.configuration} -f {self.fold} -n {self.num_replicas} -tr {self.base}{extra}"

    # ---- completion checks (the truth is on disk) -------------------------------------------------------------
    def _trained(self, trainer: str) -> bool:
        folder = self.fold_folder(trainer)
        return (os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
                and os.path.isfile(os.path.join(folder, "validation", "summary.json")))

    def done(self, stage: str) -> bool:
        if stage == "convert":
            return (os.path.isfile(os.path.join(self.raw_folder, "dataset.json"))
                    and len(_nii_files(os.path.join(self.raw_folder, "labelsTr"))) == len(self.task.training_cases))
        if stage == "plan_preprocess":
            return self._preprocessed()
        if stage == "baseline":
            return self._trained(self.base)
        if stage == "replicas":
            return all(self._trained(n) for n in self.replica_names)
        if stage == "samples":
            manifest = os.path.join(self.preprocessed_base, "varaug",
                                    f"{self.plans}__{self.configuration}__fold_{self.fold}", "manifest.json")
            if not os.path.isfile(manifest):
                return False
            with open(manifest) as f:
                listed = json.load(f).get("replicas") or []
            return [r.get("name") if isinstance(r, dict) else r for r in listed] == self.replica_names
        if stage == "varaug":
            return self._trained(self.varaug_trainer)
        if stage == "evaluate":
            path = os.path.join(self.out, "evaluation", "dice.json")
            if not os.path.isfile(path):
                return False
            with open(path) as f:
                return json.load(f).get("inputs") == self._evaluation_inputs()
        if stage == "analyze":
            return os.path.isfile(os.path.join(self.out, "analysis", "report.html"))
        raise ValueError(stage)

    def _preprocessed(self) -> bool:
        plans_file = os.path.join(self.preprocessed_base, f"{self.plans}.json")
        if not os.path.isfile(plans_file):
            return False
        with open(plans_file) as f:
            configurations = json.load(f)["configurations"]
        if self.configuration not in configurations:
            raise VarAugError(f"configuration '{self.configuration}' is not in {plans_file} (nnU-Net planned: "
                              f"{', '.join(sorted(configurations))}): pass one of them with -c")
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = os.path.join(self.preprocessed_base, configurations[self.configuration].get(
            "data_identifier", f"{self.plans}_{self.configuration}"))
        if not os.path.isdir(folder):
            return False
        cases = infer_dataset_class(folder).get_identifiers(folder)
        gt = os.path.join(self.preprocessed_base, "gt_segmentations")
        return len(cases) == len(self.task.training_cases) and os.path.isdir(gt) and \
            len(_nii_files(gt)) == len(self.task.training_cases)

    def _evaluation_inputs(self) -> Dict[str, List[float]]:
        """What the evaluation was computed from: size and mtime of every model's final checkpoint."""
        inputs = {}
        for trainer in [self.base, *self.replica_names, self.varaug_trainer]:
            path = self.layout.final_checkpoint(trainer)
            st = os.stat(path) if os.path.isfile(path) else None
            inputs[trainer] = [st.st_size, round(st.st_mtime, 3)] if st else None
        return inputs

    # ---- checks before work ----------------------------------------------------------------------------------
    def check_dataset_id(self) -> None:
        """The target id must be free or hold this very task; the task must not be converted under another id."""
        from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

        taken = sorted(set(find_candidate_datasets(self.dataset_id)) - {self.dataset})
        if taken:
            raise VarAugError(f"dataset id {self.dataset_id} is taken by {taken[0]} (nnUNet_raw, nnUNet_preprocessed "
                              f"or nnUNet_results): pass -d with a free id to convert {self.task.folder_name} there, "
                              f"e.g. -d {self._free_id()}")
        others = sorted({os.path.basename(p) for root in ("nnUNet_raw", "nnUNet_preprocessed")
                         for p in glob.glob(os.path.join(os.environ[root], f"Dataset[0-9][0-9][0-9]_{self.task.name}"))
                         if os.path.basename(p) != self.dataset})
        if others and not os.path.isdir(self.raw_folder):
            other_id = dataset_id_of(others[0])
            raise VarAugError(f"{self.task.folder_name} was already converted as {others[0]}: benchmark that one with "
                              f"-d {other_id} (its preprocessed data and models are reused), or delete it to "
                              f"convert the task again under id {self.dataset_id}")
        if os.path.isfile(os.path.join(self.raw_folder, "dataset.json")):
            have = sorted(f[: -len(".nii.gz")] for f in _nii_files(os.path.join(self.raw_folder, "labelsTr")))
            if have and have != self.task.training_cases:
                raise VarAugError(f"{self.raw_folder} holds other cases than {self.task.folder}/dataset.json lists "
                                  f"(e.g. {sorted(set(have) ^ set(self.task.training_cases))[0]}): it is not this "
                                  f"task; pass -d with a free id, e.g. -d {self._free_id()}")

    def check_trainers(self) -> None:
        """The base trainer must be one nnU-Net can find; its ``_seed``/``_varaug`` names must parse."""
        from nnunet_varaug import registry

        try:
            registry.resolve(self.base)
            for name in [*self.replica_names, self.varaug_trainer]:
                registry.parse(name)
        except registry.TrainerNameError as e:
            raise VarAugError(f"unknown base trainer '{self.base}': {e}") from None

    def _free_id(self) -> int:
        from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

        for candidate in [500 + self.task.task_id, *range(500, 1000)]:
            if candidate <= 999 and len(find_candidate_datasets(candidate)) == 0:
                return candidate
        return 999

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
    def _call(self, stage: str, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log_path = os.path.join(self.out, "logs", f"{stage}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        record = self.stage_record(stage)
        record.setdefault("commands", [])
        if shlex.join(command) not in record["commands"]:
            record["commands"].append(shlex.join(command))
        record["log"] = log_path
        print(f"    $ {shlex.join(command)}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"# nnunet_varaug benchmark: {datetime.datetime.now().isoformat(timespec='seconds')} "
                      f"$ {shlex.join(command)}\n")
            log.flush()
            code = subprocess.call(command, env=env or plugin_env(), stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise StageFailed(f"stage '{stage}' failed: `{shlex.join(command)}` exited {code}; see {log_path}. "
                              f"Rerun the same command to retry it (finished stages are skipped)")

    def _train(self, stage: str, trainer: str) -> None:
        folder = self.fold_folder(trainer)
        cmd = nnunet_command("nnUNetv2_train") + [str(self.dataset_id), self.configuration, self.fold, "-tr", trainer,
                                                  "-p", self.plans, "-device", self.device]
        if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
            cmd.append("--val")  # trained, but the validation predictions are missing
        elif os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")):
            cmd.append("--c")
        self._call(stage, cmd)

    def run_stage(self, stage: str) -> None:
        np_flag = [] if self.num_processes is None else ["-np", str(self.num_processes)]
        experiment = ["-d", str(self.dataset_id), "-c", self.configuration, "-f", self.fold,
                      "-n", str(self.num_replicas), "-tr", self.base, "-p", self.plans]
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
            devices = [] if self.devices is None else ["--devices", self.devices]
            self._call(stage, nnunet_command("nnunet_varaug") + ["replicas", *experiment, "-device", self.device]
                       + devices)
        elif stage == "samples":
            self._call(stage, nnunet_command("nnunet_varaug") + ["samples", *experiment, "-device", self.device])
        elif stage == "varaug":
            self._train(stage, self.varaug_trainer)
        elif stage == "evaluate":
            self.evaluate()
        elif stage == "analyze":
            self._call(stage, nnunet_command("nnunet_varaug") + ["analyze", *experiment, "-device", self.device,
                                                                 "-o", os.path.join(self.out, "analysis"), "--quiet"])
        if not self.done(stage):
            raise StageFailed(f"stage '{stage}' ran but its outputs are not complete; see "
                              f"{self.stage_record(stage).get('log', 'its log')}")

    def run(self, stages: Sequence[str]) -> int:
        """Run ``stages`` in order, skipping complete ones; write results.md. Returns the exit code."""
        if "convert" in stages or not self.done("convert"):
            self.check_dataset_id()
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
            print(f"{label}: done in {_fmt_seconds(time.monotonic() - start)}", flush=True)
        path = self.write_results()
        print(f"results: {path}")
        return code

    # ---- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Per-label Dice on the fold's validation cases, all from nnU-Net's ``compute_metrics_on_folder``: the
        baseline, each replica and the varaug model (their ``validation/summary.json``), and the replicas' majority
        vote (computed here from their exported validation predictions, evaluated the same way)."""
        import numpy as np
        from nnunetv2.evaluation.evaluate_predictions import (compute_metrics_on_folder, label_or_region_to_key,
                                                              load_summary_json)
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_varaug.variability import voxel_maps

        exp = self.experiment()
        plans_manager = PlansManager(exp.plans_json)
        dataset_json = exp.dataset_json
        label_manager = plans_manager.get_label_manager(dataset_json)
        ending = dataset_json["file_ending"]
        rw = plans_manager.image_reader_writer_class()
        val_cases = sorted(exp.split()[1])
        keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
        gt_folder = os.path.join(self.preprocessed_base, "gt_segmentations")
        out = os.path.join(self.out, "evaluation")
        os.makedirs(out, exist_ok=True)

        def folder_of(trainer: str) -> str:
            folder = os.path.join(self.fold_folder(trainer), "validation")
            missing = [c for c in val_cases if not os.path.isfile(os.path.join(folder, c + ending))]
            if missing:
                raise VarAugError(f"{trainer} has no validation prediction of {len(missing)} case(s) in {folder} "
                                  f"(e.g. {missing[0]}): run `nnUNetv2_train {self.dataset_id} {self.configuration} "
                                  f"{self.fold} -tr {trainer} -p {self.plans} --val`")
            return folder

        def summarize(result: dict) -> dict:
            return {"dice": {label_or_region_to_key(k): float(result["mean"][k]["Dice"]) for k in keys},
                    "foreground_mean": float(result["foreground_mean"]["Dice"]),
                    "num_cases": len(result["metric_per_case"])}

        def trained(trainer: str) -> dict:
            """nnU-Net's own evaluation of the model's validation predictions (``validation/summary.json``, written
            by ``compute_metrics_on_folder`` at the end of training), copied to ``evaluation/<trainer>.json``."""
            folder = folder_of(trainer)
            result = load_summary_json(os.path.join(folder, "summary.json"))
            evaluated = sorted(os.path.basename(c["prediction_file"])[: -len(ending)] for c in result["metric_per_case"])
            if evaluated != val_cases:
                raise VarAugError(f"{folder}/summary.json does not cover the {len(val_cases)} validation cases of fold "
                                  f"{self.fold}: run `nnUNetv2_train {self.dataset_id} {self.configuration} {self.fold} "
                                  f"-tr {trainer} -p {self.plans} --val` to evaluate it again")
            shutil.copyfile(os.path.join(folder, "summary.json"), os.path.join(out, f"{trainer}.json"))
            return {"trainer": trainer, **summarize(result)}

        models = {"baseline": trained(self.base)}
        for name in self.replica_names:
            models[name] = trained(name)

        # the replicas' majority vote of each validation case, in the raw grid of their exported predictions
        vote_folder = os.path.join(out, "majority_vote")
        shutil.rmtree(vote_folder, ignore_errors=True)
        os.makedirs(vote_folder)
        labels = sorted(int(v) for v in label_manager.all_labels)
        folders = [folder_of(n) for n in self.replica_names]
        for case in val_cases:
            segs, props = [], None
            for folder in folders:
                seg, p = rw.read_seg(os.path.join(folder, case + ending))
                segs.append(seg[0])
                props = props or p
            majority = voxel_maps(np.stack(segs), labels)[0]
            rw.write_seg(majority.astype(np.uint8 if max(labels) < 256 else np.int16),
                         os.path.join(vote_folder, case + ending), props)
        result = compute_metrics_on_folder(gt_folder, vote_folder, os.path.join(out, "majority_vote.json"), rw, ending,
                                           keys, label_manager.ignore_label, num_processes=1)
        models["majority_vote"] = {"trainer": f"majority vote of {', '.join(self.replica_names)}", **summarize(result)}
        models["varaug"] = trained(self.varaug_trainer)

        names = {}
        for name, value in dataset_json["labels"].items():
            key = label_or_region_to_key(tuple(value) if isinstance(value, (list, tuple)) else int(value))
            if key in {label_or_region_to_key(k) for k in keys}:
                names[key] = name
        summary = {"dataset": self.dataset, "configuration": self.configuration, "fold": self.fold,
                   "validation_cases": val_cases, "labels": names, "models": models,
                   "inputs": self._evaluation_inputs()}
        write_text(os.path.join(out, "dice.json"), json.dumps(summary, indent=2) + "\n")
        return summary

    # ---- results.md -------------------------------------------------------------------------------------------
    def write_results(self) -> str:
        path = os.path.join(self.out, "results.md")
        os.makedirs(self.out, exist_ok=True)
        write_text(path, render_results(self))
        return path


def _mean_sd(values: Sequence[float]) -> str:
    import numpy as np

    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def render_results(bench: Benchmark) -> str:
    """results.md: the Dice table (with nnU-Net's published numbers), variability summary, compute per stage."""
    lines = [f"# nnunet_varaug benchmark: {bench.task.folder_name}", "",
             f"{bench.dataset}, configuration `{bench.configuration}`, fold {bench.fold}, base trainer `{bench.base}`, "
             f"{bench.num_replicas} seed replicas, variability-augmented trainer `{bench.varaug_trainer}`, "
             f"plans `{bench.plans}`, device `{bench.device}`.", ""]
    dice_path = os.path.join(bench.out, "evaluation", "dice.json")
    published = PUBLISHED_DICE.get(bench.task.folder_name)
    lines += ["## Dice on the fold's validation cases", ""]
    if os.path.isfile(dice_path):
        with open(dice_path) as f:
            ev = json.load(f)
        keys = list(ev["labels"])
        head = ["model", *[f"{ev['labels'][k]} ({k})" for k in keys], "mean"]
        rows = []
        models = ev["models"]

        def row(title: str, m: dict) -> List[str]:
            return [title, *[f"{m['dice'][k]:.4f}" for k in keys], f"{m['foreground_mean']:.4f}"]

        rows.append(row(f"baseline `{models['baseline']['trainer']}`", models["baseline"]))
        for name in bench.replica_names:
            rows.append(row(f"replica `{name}`", models[name]))
        reps = [models[n] for n in bench.replica_names]
        rows.append([f"replicas, mean ± sd (n={len(reps)})", *[_mean_sd([m["dice"][k] for m in reps]) for k in keys],
                     _mean_sd([m["foreground_mean"] for m in reps])])
        rows.append(row(f"majority vote of the {len(reps)} replicas", models["majority_vote"]))
        rows.append(row(f"variability-augmented `{models['varaug']['trainer']}`", models["varaug"]))
        if published:
            ref = [published["dice"].get(ev["labels"][k].lower()) for k in keys]
            mean = f"{sum(ref) / len(ref):.3f}" if all(r is not None for r in ref) else "–"
            rows.append(["nnU-Net, published (MSD test set)¹", *[f"{r:.2f}" if r is not None else "–" for r in ref],
                         mean])
        lines += _table(head, rows)
        lines += ["", f"{len(ev['validation_cases'])} validation cases; Dice from nnU-Net's "
                      "`compute_metrics_on_folder` against `gt_segmentations` (per-case files in `evaluation/`). "
                      "The majority vote takes, per voxel, the label most replicas predict (ties: the smaller label)."]
        if published:
            lines += ["", f"¹ {published['source']}. Published numbers are the Decathlon's hidden test set, predicted "
                          "by nnU-Net's cross-validated ensemble; the rows above are one fold's validation cases of "
                          "single models, so compare them with each other first and with the reference only roughly."]
        else:
            lines += ["", f"No published nnU-Net Dice is stored for {bench.task.folder_name} "
                          f"(known: {', '.join(sorted(PUBLISHED_DICE))}; see docs/benchmark.md)."]
    else:
        lines += ["(not evaluated yet: run the `evaluate` stage)"]
    summary_csv = os.path.join(bench.out, "analysis", "summary.csv")
    if os.path.isfile(summary_csv):
        import csv

        with open(summary_csv) as f:
            table = list(csv.reader(f))
        if table:
            lines += ["", "## Variability of the replicas (`analysis/summary.csv`)", ""]
            lines += _table(table[0], [[_short(c) for c in r] for r in table[1:21]])
            lines += ["", "Full report: [analysis/report.html](analysis/report.html)"]
    lines += ["", "## Compute", "", ]
    rows, total = [], 0.0
    for stage in STAGES:
        rec = bench.state["stages"].get(stage, {})
        seconds = rec.get("seconds")
        total += seconds or 0.0
        status = rec.get("status", "pending") + (f" ({rec['note']})" if rec.get("note") else "")
        rows.append([stage, status, _fmt_seconds(seconds), str(rec.get("attempts", 0)),
                     os.path.relpath(rec["log"], bench.out) if rec.get("log") else "–"])
    rows.append(["**total**", "", _fmt_seconds(total), "", ""])
    lines += _table(["stage", "status", "compute (h:mm:ss)", "attempts", "log"], rows)
    lines += ["", "Compute is wall time of the stage's commands on this machine, summed over attempts (resumed "
                  "stages count every attempt); a stage found complete on disk without a record shows –.", ""]
    return "\n".join(lines)


def _short(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() and "." not in cell else f"{value:.4g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


# ---- command line -------------------------------------------------------------------------------------------------
def parse_stages(text: Optional[str]) -> List[str]:
    if text is None or text.strip() in ("", "all"):
        return list(STAGES)
    asked = [s.strip() for s in re.split(r"[,\s]+", text.strip()) if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown:
        raise VarAugError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in asked]  # always in pipeline order


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--msd", required=True, metavar="TASK_FOLDER",
                   help="an extracted Decathlon task, e.g. /data/Task04_Hippocampus (imagesTr, labelsTr, imagesTs, "
                        "dataset.json)")
    p.add_argument("-d", dest="dataset_id", type=int, default=None,
                   help="nnU-Net dataset id to convert the task to (default: the task's number)")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-f", dest="fold", default="0", help="fold (default 0)")
    p.add_argument("-n", dest="num_replicas", type=int, default=5, help="number of seed replicas K (default 5)")
    p.add_argument("-tr", dest="base", default="nnUNetTrainer", help="base trainer (default nnUNetTrainer)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-pl", dest="planner", default="ExperimentPlanner",
                   help="planner for plan_preprocess (default ExperimentPlanner, which writes nnUNetPlans)")
    p.add_argument("--varaug-p", dest="p", type=int, default=None, metavar="NN",
                   help="probability (percent) of training on a variability sample: trains <BASE>_varaug_p<NN> "
                        "(default: <BASE>_varaug, p = 0.5)")
    p.add_argument("-o", dest="output", default=None,
                   help="output folder for results.md, the state, logs, evaluation and analysis "
                        "(default ./varaug_benchmark_<TaskNN_Name>)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all, in this order)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train's -device")
    p.add_argument("--devices", default=None, metavar="0,1,…",
                   help="train the replicas one per GPU at a time on these GPUs (replicas --devices)")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for conversion, preprocessing and evaluation (default: nnU-Net's)")


def run(args: argparse.Namespace) -> int:
    for var, what in (("nnUNet_raw", "the converted task goes there"),
                      ("nnUNet_preprocessed", "plans and preprocessed data go there"),
                      ("nnUNet_results", "trained models go there")):
        require_env(var, what)
    stages = parse_stages(args.stages)
    task = read_msd_task(args.msd)
    out = args.output or os.path.join(os.getcwd(), f"varaug_benchmark_{task.folder_name}")
    bench = Benchmark(task, out, args.dataset_id, args.configuration, args.fold, args.num_replicas, args.base,
                      args.plans, args.planner, args.device, args.num_processes, args.p, args.devices)
    return bench.run(stages)
