"""``nnunet_varaug replicas``: train K replicas through nnU-Net's own ``nnUNetv2_train``, resumably.

Each replica is one ``nnUNetv2_train D C F -tr <Base>_<kind><K>`` process. A replica with
``checkpoint_final.pth`` is skipped, one with only ``checkpoint_latest.pth`` is continued (``--c``), a failing
one does not stop the others, and the command exits non-zero if any failed. The launcher decides where the
processes run (the processes themselves: :mod:`nnunet_varaug.launch.runner`):

* ``local`` (default): one after the other on this machine;
* ``local --devices 0,1,…``: one replica per GPU at a time, each process seeing only its GPU through
  ``CUDA_VISIBLE_DEVICES``; a GPU takes the next replica as soon as it is free;
* ``slurm``: one SLURM job per replica, submitted as one job array through submitit. A job stopped by its time
  limit or a preemption keeps its last completed epoch and is requeued, continuing with ``--c``; a job killed by
  a node failure or the memory limit is resubmitted ``--slurm-retries`` times; a rerun of the command skips finished
  replicas and those whose job is still queued or running (recorded in ``<fold>/nnunet_varaug_slurm.json``); see
  :mod:`nnunet_varaug.launch.slurm`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from nnunet_varaug.commands.flags import add_device, add_experiment_arguments
from nnunet_varaug.training.experiment import Experiment
from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.launch.runner import TrainJob, parse_devices, run_devices, run_local, train_job
from nnunet_varaug.launch.slurm import (SlurmSettings, check_slurm_time, parse_mem_gb, parse_slurm_time,
                                        run_slurm)


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
                       help="time limit per job, SLURM format (default 24:00:00); a job that reaches it keeps its "
                            "last completed epoch and is requeued; shorter than one epoch (from the replicas' logs) "
                            "is refused")
    slurm.add_argument("--slurm-gpus-per-node", type=int, default=None,
                       help="GPUs per job (default 1 with -device cuda, else 0)")
    slurm.add_argument("--slurm-mem", default=None, help="memory per job, e.g. 64G (default: the cluster's)")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=None,
                       help="CPUs per job, for nnU-Net's data-augmentation workers (default: the cluster's)")
    slurm.add_argument("--slurm-account", default=None, help="account to charge (sbatch --account)")
    slurm.add_argument("--slurm-qos", default=None, help="quality of service (sbatch --qos)")
    slurm.add_argument("--slurm-constraint", default=None,
                       help="node features required, e.g. a100 or 'a100|h100' (sbatch --constraint)")
    slurm.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="N",
                       help="at most N replicas' jobs run at once (the job array's %%N; default: all)")
    slurm.add_argument("--slurm-retries", type=int, default=0, metavar="N",
                       help="resubmit a replica whose job the scheduler killed (NODE_FAIL, BOOT_FAIL, "
                            "OUT_OF_MEMORY) up to N times, continuing from its last epoch (default 0); a training "
                            "that fails by itself is not retried")
    slurm.add_argument("--slurm-executor", default="slurm", choices=["slurm", "local"],
                       help="'local' runs the same submitit job array on this machine (to try the SLURM path "
                            "without a cluster)")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return instead of waiting for the jobs")


SLURM_DEFAULTS = {"slurm_partition": None, "slurm_time": "24:00:00", "slurm_gpus_per_node": None, "slurm_mem": None,
                  "slurm_cpus_per_task": None, "slurm_account": None, "slurm_qos": None, "slurm_constraint": None,
                  "slurm_array_parallelism": None, "slurm_retries": 0, "slurm_executor": "slurm", "no_wait": False}
POLL_ENV = "VARAUG_SLURM_POLL_SECONDS"


def _positive(flag: str, value: Optional[int], minimum: int = 1) -> Optional[int]:
    if value is not None and value < minimum:
        raise VarAugError(f"{flag} must be at least {minimum}, got {value}")
    return value


def slurm_settings(args: argparse.Namespace) -> SlurmSettings:
    """The SLURM settings of ``args``, every flag checked; VarAugError names the first bad one."""
    gpus = args.slurm_gpus_per_node if args.slurm_gpus_per_node is not None else (1 if args.device == "cuda" else 0)
    try:
        poll = float(os.environ.get(POLL_ENV, 30))
    except ValueError:
        raise VarAugError(f"{POLL_ENV} must be a number of seconds, got '{os.environ[POLL_ENV]}'") from None
    return SlurmSettings(
        time_min=parse_slurm_time(args.slurm_time), gpus_per_node=_positive("--slurm-gpus-per-node", gpus, 0),
        partition=args.slurm_partition, mem_gb=parse_mem_gb(args.slurm_mem),
        cpus_per_task=_positive("--slurm-cpus-per-task", args.slurm_cpus_per_task),
        account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
        array_parallelism=_positive("--slurm-array-parallelism", args.slurm_array_parallelism),
        retries=_positive("--slurm-retries", args.slurm_retries, 0), executor=args.slurm_executor,
        wait=not args.no_wait, poll_s=max(0.1, poll))


def run(args: argparse.Namespace) -> int:
    launcher = getattr(args, "launcher", "local")
    devices = parse_devices(getattr(args, "devices", None))
    if launcher == "slurm" and devices:
        raise VarAugError("--devices is for --launcher local; SLURM assigns GPUs to each job "
                          "(use --slurm-gpus-per-node)")
    settings = None
    if launcher == "local":
        given = ["--" + key.replace("_", "-") for key, default in SLURM_DEFAULTS.items()
                 if getattr(args, key, default) != default]
        if given:
            raise VarAugError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --launcher slurm")
    else:
        settings = slurm_settings(args)
    exp = Experiment.from_args(args.dataset, args.configuration, args.fold, args.num_replicas, args.base,
                               args.kind, args.plans, args.start)
    if settings is not None:
        print(check_slurm_time(exp, settings, args.device))
    jobs = train_jobs(exp, args.device, args.npz)
    if jobs:
        exp.write_default_splits()  # once, here, not by trainings started side by side
    outcome = {n: "finished (skipped)" for n in exp.replica_names if exp.replica_state(n) == "finished"}
    if settings is not None:
        waiting = run_slurm(exp, jobs, settings)
        outcome.update(waiting)
        jobs = [j for j in jobs if j.name not in waiting]
    elif devices:
        run_devices(jobs, devices)
    else:
        run_local(jobs)
    for job in jobs:
        if job.returncode == 0 and exp.replica_state(job.name) == "finished":
            outcome[job.name] = ("resumed, finished" if job.resumed else "trained") + (f" ({job.note})" if job.note
                                                                                       else "")
        else:
            outcome[job.name] = f"FAILED ({job.note or f'exit {job.returncode}'}; see {job.log})"
    print(status_table(exp, outcome))
    failed = [j.name for j in jobs if outcome[j.name].startswith("FAILED")]
    if failed:
        print(f"{len(failed)} replica(s) failed: {', '.join(failed)}. Rerun the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0
