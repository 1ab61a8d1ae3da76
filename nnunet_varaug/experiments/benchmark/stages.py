"""The stages of ``nnunet_varaug benchmark``: what each one runs, when it is complete, and the run over them.

A stage is complete when its outputs are on disk and made from the current inputs (checkpoints and sample sets
judged by sha256), so an interrupted benchmark continues where it stopped; its state and settings:
:mod:`nnunet_varaug.experiments.benchmark.state`.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from typing import Sequence

from nnunet_varaug.experiments.benchmark import holdout, variants
from nnunet_varaug.experiments.benchmark.checks import check_requirements, check_trainers
from nnunet_varaug.experiments.benchmark.evaluation import evaluate
from nnunet_varaug.experiments.benchmark.results import write_results
from nnunet_varaug.experiments.benchmark.state import Benchmark, StageFailed, fmt_seconds
from nnunet_varaug.experiments.benchmark.task import check_dataset_id, nii_files
from nnunet_varaug.launch.runner import nnunet_command, plugin_env
from nnunet_varaug.utilities.errors import VarAugError


def done(bench: Benchmark, stage: str) -> bool:
    """Whether ``stage``'s outputs are on disk and made from the current inputs (the truth is on disk)."""
    if stage == "convert":
        held = os.path.join(bench.raw_folder, holdout.HELD_OUT_LABELS)
        return (os.path.isfile(os.path.join(bench.raw_folder, "dataset.json"))
                and len(nii_files(os.path.join(bench.raw_folder, "labelsTr")))
                + (len(nii_files(held)) if os.path.isdir(held) else 0) == len(bench.task.training_cases))
    if stage == "holdout":
        return holdout.holdout_done(bench)
    if stage == "plan_preprocess":
        return holdout.preprocessed_done(bench)
    if stage == "splits":
        return holdout.splits_done(bench)
    if stage == "baseline":
        return bench.trained(bench.base)
    if stage == "replicas":
        return all(bench.trained(n, f) for f in bench.replica_folds for n in bench.replica_names)
    if stage == "samples":
        return all(variants.samples_current(bench, x) for x in bench.sources)
    if stage == "varaug":
        return all(bench.trained(t) for t in bench.varaug_trainers)
    if stage == "stability":
        return all(bench.trained(t) for t in bench.all_stability_names)
    if stage == "evaluate":
        path = os.path.join(bench.out, "evaluation", "dice.json")
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            return json.load(f).get("inputs") == bench.evaluation_inputs()
    if stage == "analyze":
        return os.path.isfile(os.path.join(bench.out, "analysis", "report.html"))
    raise ValueError(stage)


def run_stage(bench: Benchmark, stage: str) -> None:
    """Run one stage's command(s); raise StageFailed when its outputs are not complete afterwards."""
    np_flag = [] if bench.num_processes is None else ["-np", str(bench.num_processes)]
    if stage == "convert":
        if os.path.isdir(bench.raw_folder):  # dataset.json is the converter's last write: this is a partial one
            if bench.stage_record("convert").get("attempts", 0) == 0:
                raise VarAugError(f"{bench.raw_folder} exists without dataset.json (an interrupted conversion "
                                  f"not made by this benchmark?): remove it and rerun")
            shutil.rmtree(bench.raw_folder)
        bench.call(stage, nnunet_command("nnUNetv2_convert_MSD_dataset")
                   + ["-i", bench.task.folder, "-overwrite_id", str(bench.dataset_id)] + np_flag)
    elif stage == "holdout":
        holdout.run_holdout(bench)
    elif stage == "splits":
        holdout.run_splits(bench)
    elif stage == "plan_preprocess":
        env = plugin_env()
        if env.get("nnUNet_n_proc_DA", "") == "0":  # nnU-Net's planner fails with 0 augmentation workers
            env["nnUNet_n_proc_DA"] = "1"
        bench.call(stage, nnunet_command("nnUNetv2_plan_and_preprocess")
                   + ["-d", str(bench.dataset_id), "-c", bench.configuration, "-pl", bench.planner,
                      "--verify_dataset_integrity"] + np_flag
                   + ([] if bench.num_processes is None else ["-npfp", str(bench.num_processes)]), env)
    elif stage == "baseline":
        bench.train(stage, bench.base)
    elif stage in ("replicas", "samples", "varaug", "stability"):
        getattr(variants, f"run_{stage}")(bench)
    elif stage == "evaluate":
        evaluate(bench)
    elif stage == "analyze":  # the replicas' variability on the held-out test split
        bench.call(stage, bench.command("analyze") + [
            "-i", os.path.join(bench.raw_folder, holdout.HELD_OUT_IMAGES),
            "-l", os.path.join(bench.raw_folder, holdout.HELD_OUT_LABELS),
            "-o", os.path.join(bench.out, "analysis"), "--quiet"])
    if not done(bench, stage):
        raise StageFailed(f"stage '{stage}' ran but its outputs are not complete; see "
                          f"{bench.stage_record(stage).get('log', 'its log')}")


def run(bench: Benchmark, stages: Sequence[str]) -> int:
    """Run ``stages`` in order, skipping complete ones; write results.md. Returns the exit code."""
    stages = [s for s in stages if s in bench.stages]
    if "convert" in stages or not done(bench, "convert"):
        check_dataset_id(bench.task, bench.dataset_id, bench.dataset)
    for i, stage in enumerate(stages):
        check_requirements(bench, stage, stages[:i], done)
    check_trainers(bench)
    code = 0
    for i, stage in enumerate(stages, 1):
        record = bench.stage_record(stage)
        label = f"[{i}/{len(stages)}] {stage}"
        if done(bench, stage):
            if record["status"] != "done":
                record.update(status="done")
                if not record.get("attempts"):
                    record["note"] = "found complete on disk"
                bench.save_state()
            print(f"{label}: complete, skipped", flush=True)
            continue
        print(f"{label}: running", flush=True)
        record.update(status="running", attempts=record.get("attempts", 0) + 1)
        bench.save_state()
        start = time.monotonic()
        try:
            run_stage(bench, stage)
        except (StageFailed, VarAugError, KeyboardInterrupt) as e:
            record.update(status="failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                          seconds=(record.get("seconds") or 0.0) + time.monotonic() - start)
            bench.save_state()
            write_results(bench)
            if isinstance(e, KeyboardInterrupt):
                raise
            print(f"nnunet_varaug benchmark: {e}", file=sys.stderr)
            code = 1 if isinstance(e, StageFailed) else 2
            break
        record.update(status="done", seconds=(record.get("seconds") or 0.0) + time.monotonic() - start,
                      finished=datetime.datetime.now().isoformat(timespec="seconds"))
        record.pop("note", None)
        bench.save_state()
        print(f"{label}: done in {fmt_seconds(time.monotonic() - start)}", flush=True)
    path = write_results(bench)
    print(f"results: {path}")
    return code
