"""``nnunet_varaug replicas``: train K replicas through nnU-Net's own ``nnUNetv2_train``, resumably.

Each replica is one ``nnUNetv2_train D C F -tr <Base>_<kind><K>`` process. A replica with
``checkpoint_final.pth`` is skipped, one with only ``checkpoint_latest.pth`` is continued (``--c``), a failing
one does not stop the others, and the command exits non-zero if any failed. The launcher decides where the
processes run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from nnunet_varaug import registry
from nnunet_varaug.experiment import Experiment, VarAugError


@dataclass
class TrainJob:
    """One replica's ``nnUNetv2_train`` call, its environment and its log file."""

    name: str
    command: List[str]
    env: Dict[str, str]
    log: str
    resumed: bool = False
    returncode: Optional[int] = field(default=None)


def nnunet_command(tool: str) -> List[str]:
    """The nnU-Net console script ``tool`` of this Python environment (falls back to PATH)."""
    local = os.path.join(os.path.dirname(sys.executable), tool)
    if os.path.isfile(local):
        return [local]
    found = shutil.which(tool)
    if found is None:
        raise VarAugError(f"{tool} not found: install nnunetv2 in this environment (`pip install nnunetv2`)")
    return [found]


def plugin_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment with nnUNet_extTrainer extended by the plugin's folder (what ``env`` prints)."""
    env = dict(os.environ if base is None else base)
    env["nnUNet_extTrainer"] = registry.ext_trainer_value(env.get("nnUNet_extTrainer", ""))
    return env


def train_jobs(exp: Experiment, device: str = "cuda", npz: bool = False) -> List[TrainJob]:
    """The jobs still to run (unfinished replicas), in replica order."""
    jobs = []
    for name in exp.replica_names:
        state = exp.replica_state(name)
        if state == "finished":
            continue
        folder = exp.fold_folder(name)
        os.makedirs(folder, exist_ok=True)
        cmd = nnunet_command("nnUNetv2_train") + [str(exp.dataset_id), exp.configuration, str(exp.fold),
                                                  "-tr", name, "-p", exp.plans, "-device", device]
        if npz:
            cmd.append("--npz")
        if state == "interrupted":
            cmd.append("--c")
        jobs.append(TrainJob(name, cmd, plugin_env(), os.path.join(folder, "nnunet_varaug_train.log"),
                             resumed=state == "interrupted"))
    return jobs


def run_local(jobs: List[TrainJob]) -> None:
    """One after the other in this machine's foreground, output to each replica's log."""
    from tqdm import tqdm

    for job in tqdm(jobs, desc="replicas", unit="replica", disable=not jobs):
        tqdm.write(f"{'resuming' if job.resumed else 'training'} {job.name} (log: {job.log})")
        with open(job.log, "a") as log:
            job.returncode = subprocess.call(job.command, env=job.env, stdout=log, stderr=subprocess.STDOUT)


def replica_summary(exp: Experiment, name: str) -> Dict[str, object]:
    """Epochs done (from the newest checkpoint) and final validation Dice (nnU-Net's summary.json)."""
    import json

    import torch

    folder = exp.fold_folder(name)
    epochs = 0
    for ckpt in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = os.path.join(folder, ckpt)
        if os.path.isfile(path):
            epochs = int(torch.load(path, map_location="cpu", weights_only=False)["current_epoch"])
            break
    dice = None
    summary = os.path.join(folder, "validation", "summary.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            dice = json.load(f)["foreground_mean"]["Dice"]
    return {"epochs": epochs, "dice": dice}


def status_table(exp: Experiment, outcome: Dict[str, str]) -> str:
    rows = [("replica", "state", "epochs", "val Dice")]
    for name in exp.replica_names:
        info = replica_summary(exp, name)
        dice = "-" if info["dice"] is None else f"{info['dice']:.4f}"
        rows.append((name, outcome.get(name, exp.replica_state(name)), str(info["epochs"]), dice))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p)
    p.add_argument("--start", type=int, default=0, help="index of the first replica (default 0)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train's -device")
    p.add_argument("--npz", action="store_true", help="save validation softmax outputs (as nnUNetv2_train --npz)")
    p.add_argument("--launcher", default="local", choices=["local"], help="where the replicas run")


def add_experiment_arguments(p: argparse.ArgumentParser, kind: bool = True) -> None:
    """The flags shared by replicas, samples, analyze: -d -c -f -n [-p] [-tr] [--kind]."""
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", dest="fold", required=True, help="fold (0..4 or 'all')")
    p.add_argument("-n", dest="num_replicas", type=int, required=True, help="number of replicas K")
    p.add_argument("-tr", dest="base", default="nnUNetTrainer", help="base trainer (default nnUNetTrainer)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    if kind:
        p.add_argument("--kind", default="seed", choices=["seed", "mca"],
                       help="seed replicas (_seed<K>) or numerical replicas (_mca<K>)")


def run(args: argparse.Namespace) -> int:
    exp = Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base,
                               args.kind, args.plans, args.start)
    jobs = train_jobs(exp, args.device, args.npz)
    outcome = {n: "finished (skipped)" for n in exp.replica_names if exp.replica_state(n) == "finished"}
    run_local(jobs)
    for job in jobs:
        if job.returncode == 0 and exp.replica_state(job.name) == "finished":
            outcome[job.name] = "resumed, finished" if job.resumed else "trained"
        else:
            outcome[job.name] = f"FAILED (exit {job.returncode}; see {job.log})"
    print(status_table(exp, outcome))
    failed = [j.name for j in jobs if outcome[j.name].startswith("FAILED")]
    if failed:
        print(f"{len(failed)} replica(s) failed: {', '.join(failed)}. Rerun the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0
