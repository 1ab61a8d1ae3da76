"""``nnunet_varaug replicas``: train K replicas through nnU-Net's own ``nnUNetv2_train``, resumably.

Each replica is one ``nnUNetv2_train D C F -tr <Base>_<kind><K>`` process. A replica with
``checkpoint_final.pth`` is skipped, one with only ``checkpoint_latest.pth`` is continued (``--c``), a failing
one does not stop the others, and the command exits non-zero if any failed. The launcher decides where the
processes run:

* ``local`` (default): one after the other on this machine;
* ``local --devices 0,1,…``: one replica per GPU at a time, each process seeing only its GPU through
  ``CUDA_VISIBLE_DEVICES``; a GPU takes the next replica as soon as it is free;
* ``slurm``: one SLURM job per replica, submitted as one job array through submitit. A job that hits its time
  limit is requeued and resumes from ``checkpoint_latest.pth``; a rerun of the command skips finished replicas
  and those whose job is still queued or running (recorded in ``<fold>/nnunet_varaug_slurm.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import submitit.helpers

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
    device: Optional[str] = field(default=None)


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


def run_job(job: TrainJob, env: Optional[Dict[str, str]] = None) -> int:
    """Run one job in the foreground, appending its output to ``job.log`` between two marker lines."""
    env = job.env if env is None else env
    with open(job.log, "a") as log:
        where = f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}" if job.device is not None else ""
        log.write(f"# nnunet_varaug: {time.strftime('%Y-%m-%d %H:%M:%S')} start {where}: "
                  f"{shlex.join(job.command)}\n")
        log.flush()
        job.returncode = subprocess.call(job.command, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.write(f"# nnunet_varaug: {time.strftime('%Y-%m-%d %H:%M:%S')} end exit={job.returncode}\n")
    return job.returncode


def run_local(jobs: List[TrainJob]) -> None:
    """One after the other in this machine's foreground, output to each replica's log."""
    from tqdm import tqdm

    for job in tqdm(jobs, desc="replicas", unit="replica", disable=not jobs):
        tqdm.write(f"{'resuming' if job.resumed else 'training'} {job.name} (log: {job.log})")
        run_job(job)


def parse_devices(text: Optional[str]) -> List[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``: distinct non-negative GPU indices, as CUDA_VISIBLE_DEVICES takes them."""
    if text is None:
        return []
    devices = [d.strip() for d in str(text).split(",") if d.strip()]
    bad = [d for d in devices if not d.isdigit()]
    if not devices or bad:
        raise VarAugError(f"--devices takes GPU indices separated by commas, e.g. --devices 0,1,2; got '{text}'")
    if len(set(devices)) != len(devices):
        raise VarAugError(f"--devices lists a GPU twice: '{text}'; each GPU trains one replica at a time")
    return devices


def run_devices(jobs: List[TrainJob], devices: Sequence[str]) -> None:
    """One replica per device at a time: each process sees only its device (``CUDA_VISIBLE_DEVICES``), and a
    device takes the next waiting replica as soon as its current one ends."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    free: "queue.Queue[str]" = queue.Queue()
    for d in devices:
        free.put(str(d))
    progress = tqdm(total=len(jobs), desc="replicas", unit="replica", disable=not jobs)

    def one(job: TrainJob) -> None:
        device = free.get()
        try:
            job.device = device
            tqdm.write(f"{'resuming' if job.resumed else 'training'} {job.name} on device {device} (log: {job.log})")
            run_job(job, dict(job.env, CUDA_VISIBLE_DEVICES=device))
        finally:
            free.put(device)
            progress.update(1)

    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        list(pool.map(one, jobs))
    progress.close()


# ---- SLURM through submitit ----------------------------------------------------------------------------------------
SLURM_RECORD = "nnunet_varaug_slurm.json"
_ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                        "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
# what a SLURM job carries over from the submitting shell; everything else comes from the compute node
_FORWARDED_ENV = ("nnUNet", "VARAUG_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def forwarded_env(env: Dict[str, str]) -> Dict[str, str]:
    """The submitter's variables a job needs (nnU-Net's, the plugin's, thread counts); the node keeps the rest
    (PATH, CUDA_VISIBLE_DEVICES from SLURM, …)."""
    return {k: v for k, v in env.items() if k.startswith(_FORWARDED_ENV)}


class TrainReplicaTask(submitit.helpers.Checkpointable):
    """What each array task runs: one replica's ``nnUNetv2_train``, in the node's environment plus the forwarded
    variables. On timeout or preemption submitit calls :meth:`checkpoint`, which stops the training and requeues
    it with ``--c`` so it continues from ``checkpoint_latest.pth``."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict:
        return {"_proc": None}  # a running process is not sent anywhere

    def __call__(self, job: TrainJob, forwarded: Dict[str, str]) -> int:
        env = dict(os.environ, **forwarded)
        with open(job.log, "a") as log:
            log.write(f"# nnunet_varaug: {time.strftime('%Y-%m-%d %H:%M:%S')} start "
                      f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} "
                      f"SLURM_JOB_ID={env.get('SLURM_JOB_ID', '')} pid={os.getpid()}: {shlex.join(job.command)}\n")
            log.flush()
            self._proc = subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT)
            code = self._proc.wait()
            log.write(f"# nnunet_varaug: {time.strftime('%Y-%m-%d %H:%M:%S')} end exit={code}\n")
        return code

    def checkpoint(self, job: TrainJob, forwarded: Dict[str, str]) -> "submitit.helpers.DelayedSubmission":
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        folder = os.path.dirname(job.log)
        command = list(job.command)
        if os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")) and "--c" not in command:
            command.append("--c")
        resumed = TrainJob(job.name, command, job.env, job.log, resumed=True)
        return submitit.helpers.DelayedSubmission(TrainReplicaTask(), resumed, forwarded)


def parse_slurm_time(text: str) -> int:
    """A SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) -> minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(text).strip())
    if m is None:
        raise VarAugError(f"--slurm-time takes SLURM's formats, e.g. 90 (minutes), 24:00:00 or 2-00:00:00; "
                          f"got '{text}'")
    fields = [int(x) for x in m.group(2).split(":")]
    if m.group(1) is None:  # M | M:S | H:M:S
        seconds = {1: lambda: fields[0] * 60, 2: lambda: fields[0] * 60 + fields[1],
                   3: lambda: fields[0] * 3600 + fields[1] * 60 + fields[2]}[len(fields)]()
    else:  # D-H | D-H:M | D-H:M:S
        fields += [0] * (3 - len(fields))
        seconds = int(m.group(1)) * 86400 + fields[0] * 3600 + fields[1] * 60 + fields[2]
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise VarAugError(f"--slurm-time must be at least one minute, got '{text}'")
    return minutes


def parse_mem_gb(text: Optional[str]) -> Optional[float]:
    """``"64G"``, ``"64GB"``, ``"64000M"``, ``"64"`` (GB) -> GB."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", str(text).strip().upper())
    if m is None:
        raise VarAugError(f"--slurm-mem takes a size such as 64G or 64000M; got '{text}'")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "": 1, "G": 1, "T": 1024}[m.group(2)]
    return float(m.group(1)) * scale


def _record_path(job: TrainJob) -> str:
    return os.path.join(os.path.dirname(job.log), SLURM_RECORD)


def active_submission(exp: Experiment, name: str) -> Optional[str]:
    """The job id of ``name``'s earlier submission if that job is still queued or running, else None."""
    path = os.path.join(exp.fold_folder(name), SLURM_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("cluster") == "local":  # submitit's local executor: the job id is the controller's pid
        try:
            with open(f"/proc/{int(record['pid'])}/cmdline", "rb") as f:
                alive = b"submitit" in f.read()
        except (OSError, ValueError, KeyError):
            alive = False
        return record["job_id"] if alive else None
    import submitit

    state = submitit.SlurmJob(record["folder"], record["job_id"]).state.split()[0].upper()
    if state in ("UNKNOWN", "NONE", ""):  # no accounting (sacct) on this cluster: ask the queue itself
        try:
            queued = subprocess.run(["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"], capture_output=True,
                                    text=True, timeout=60).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            queued = []
        state = queued[0].upper() if queued else state
    return record["job_id"] if state in _ACTIVE_SLURM_STATES else None


def slurm_executor(folder: str, args: argparse.Namespace, num_jobs: int, name: str = "varaug"):
    """A submitit executor for the replicas: SLURM, or submitit's local executor (``--slurm-executor local``),
    which runs the very same pickled job array on this machine."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=args.slurm_executor,
                                     slurm_max_num_timeout=20, local_max_num_timeout=20)
    gpus = args.slurm_gpus_per_node if args.slurm_gpus_per_node is not None else (1 if args.device == "cuda" else 0)
    params = dict(timeout_min=parse_slurm_time(args.slurm_time), gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                  name=name,
                  slurm_array_parallelism=max(1, num_jobs))
    mem = parse_mem_gb(args.slurm_mem)
    if mem is not None:
        params["mem_gb"] = mem
    if args.slurm_cpus_per_task is not None:
        params["cpus_per_task"] = args.slurm_cpus_per_task
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    executor.update_parameters(**params)
    return executor


def run_slurm(exp: Experiment, jobs: List[TrainJob], args: argparse.Namespace) -> Dict[str, str]:
    """Submit ``jobs`` as one job array; wait for them unless ``--no-wait``. Returns each replica's outcome for
    the status table (only for replicas that are not known to have finished)."""
    outcome: Dict[str, str] = {}
    pending = []
    for job in jobs:
        running = active_submission(exp, job.name)
        if running is not None:
            outcome[job.name] = f"queued/running (job {running})"
        else:
            pending.append(job)
    if not pending:
        return outcome
    folder = os.path.join(os.environ["nnUNet_results"], exp.dataset, "varaug_slurm",
                          f"{exp.plans}__{exp.configuration}__fold_{exp.fold}")
    os.makedirs(folder, exist_ok=True)
    executor = slurm_executor(folder, args, len(pending), name=f"varaug_{exp.dataset}")
    forwarded = forwarded_env(pending[0].env)
    # the pickled jobs carry only the forwarded variables, not the whole login environment
    shipped = [dataclasses.replace(job, env={}) for job in pending]
    submitted = executor.map_array(TrainReplicaTask(), shipped, [forwarded] * len(pending))
    for job, sub in zip(pending, submitted):
        record = {"job_id": sub.job_id, "folder": folder, "cluster": args.slurm_executor,
                  "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": job.command}
        if args.slurm_executor == "local":
            record["pid"] = int(str(sub.job_id).split("_")[0])
        tmp = _record_path(job) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, _record_path(job))
        outcome[job.name] = f"submitted (job {sub.job_id})"
        print(f"submitted {job.name}: job {sub.job_id} (training log: {job.log}; submitit logs: {folder})")
    if args.no_wait:
        print("not waiting (--no-wait): rerun this command to see the status; it submits nothing that is queued, "
              "running or finished")
        return outcome
    print(f"waiting for {len(submitted)} job(s); Ctrl-C stops waiting, not the jobs")
    for job, sub in zip(pending, submitted):
        try:
            job.returncode = int(sub.result())
        except KeyboardInterrupt:
            print("stopped waiting; the jobs keep running. Rerun this command to see their status.", file=sys.stderr)
            break
        except Exception as e:  # the job itself failed (killed, out of memory, not requeued, …)
            job.returncode = -1
            print(f"{job.name}: job {sub.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                  f" (submitit log: {sub.paths.stderr})", file=sys.stderr)
        outcome.pop(job.name, None)
    return outcome


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
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_experiment_arguments(p)
    p.add_argument("--start", type=int, default=0, help="index of the first replica (default 0)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train's -device")
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
