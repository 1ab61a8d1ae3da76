"""``nnunet_varaug replicas``: train K replicas through nnU-Net's own ``nnUNetv2_train``, resumably.

Each replica is one ``nnUNetv2_train D C F -tr <Base>_<kind><K>`` process. A replica with
``checkpoint_final.pth`` is skipped, one with only ``checkpoint_latest.pth`` is continued (``--c``), a failing
one does not stop the others, and the command exits non-zero if any failed. The launcher decides where the
processes run (the processes themselves: :mod:`nnunet_varaug.launch.runner`):

* ``local`` (default): one after the other on this machine;
* ``local --devices 0,1,…``: one replica per GPU at a time, each process seeing only its GPU through
  ``CUDA_VISIBLE_DEVICES``; a GPU takes the next replica as soon as it is free;
* ``slurm``: one SLURM job per replica, submitted as one job array through submitit. A job that hits its time
  limit is requeued and resumes from ``checkpoint_latest.pth``; a rerun of the command skips finished replicas
  and those whose job is still queued or running (recorded in ``<fold>/nnunet_varaug_slurm.json``); see
  :mod:`nnunet_varaug.launch.slurm`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

from nnunet_varaug.commands.flags import add_device, add_experiment_arguments
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.launch.runner import TrainJob, parse_devices, run_devices, run_local, train_job
from nnunet_varaug.launch.slurm import parse_mem_gb, parse_slurm_time, run_slurm


def train_jobs(exp: Experiment, device: str = "cuda", npz: bool = False) -> List[TrainJob]:
    """The jobs still to run (unfinished replicas), in replica order."""
    return [train_job(exp, name, device, npz) for name in exp.replica_names
            if exp.replica_state(name) != "finished"]


def replica_summary(exp: Experiment, name: str) -> Dict[str, object]:
    """Epochs done (from the newest checkpoint) and final validation Dice (nnU-Net's summary.json)."""
    import torch

    folder = exp.fold_folder(name)
    epochs = 0
    for path in (exp.final_checkpoint(name), exp.latest_checkpoint(name)):
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
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p)
    add_device(p, "nnUNetv2_train")
    p.add_argument("--npz", action="store_true", help="save validation softmax outputs (as nnUNetv2_train --npz)")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="where the replicas run: this machine (default) or SLURM jobs through submitit")
    p.add_argument("--devices", default=None, metavar="0,1,…",
                   help="local launcher: GPUs to train on, one replica per GPU at a time (CUDA_VISIBLE_DEVICES)")
    slurm = p.add_argument_group("SLURM (--launcher slurm)")
    slurm.add_argument("--slurm-partition", default=None, help="partition to submit to (default: the cluster's)")
    slurm.add_argument("--slurm-time", default="24:00:00",
                       help="time limit per job, SLURM format (default 24:00:00); a job that reaches it is "
                            "requeued and resumes from its latest checkpoint")
    slurm.add_argument("--slurm-gpus-per-node", type=int, default=None,
                       help="GPUs per job (default 1 with -device cuda, else 0)")
    slurm.add_argument("--slurm-mem", default=None, help="memory per job, e.g. 64G (default: the cluster's)")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=None,
                       help="CPUs per job, for nnU-Net's data-augmentation workers (default: the cluster's)")
    slurm.add_argument("--slurm-executor", default="slurm", choices=["slurm", "local"],
                       help="'local' runs the same submitit job array on this machine (to try the SLURM path "
                            "without a cluster)")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return instead of waiting for the jobs")


def run(args: argparse.Namespace) -> int:
    launcher = getattr(args, "launcher", "local")
    devices = parse_devices(getattr(args, "devices", None))
    if launcher == "slurm" and devices:
        raise VarAugError("--devices is for --launcher local; SLURM assigns GPUs to each job "
                          "(use --slurm-gpus-per-node)")
    if launcher == "local":
        given = [flag for flag, value, default in (
            ("--slurm-partition", getattr(args, "slurm_partition", None), None),
            ("--slurm-time", getattr(args, "slurm_time", "24:00:00"), "24:00:00"),
            ("--slurm-gpus-per-node", getattr(args, "slurm_gpus_per_node", None), None),
            ("--slurm-mem", getattr(args, "slurm_mem", None), None),
            ("--slurm-cpus-per-task", getattr(args, "slurm_cpus_per_task", None), None),
            ("--slurm-executor", getattr(args, "slurm_executor", "slurm"), "slurm"),
            ("--no-wait", getattr(args, "no_wait", False), False)) if value != default]
        if given:
            raise VarAugError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --launcher slurm")
    else:
        parse_slurm_time(args.slurm_time)
        parse_mem_gb(args.slurm_mem)
    exp = Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base,
                               args.kind, args.plans, args.start)
    jobs = train_jobs(exp, args.device, args.npz)
    outcome = {n: "finished (skipped)" for n in exp.replica_names if exp.replica_state(n) == "finished"}
    if launcher == "slurm":
        waiting = run_slurm(exp, jobs, args)
        outcome.update(waiting)
        jobs = [j for j in jobs if j.name not in waiting]
    elif devices:
        run_devices(jobs, devices)
    else:
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
