"""Shared, expensive fixtures: an nnU-Net environment, a preprocessed synthetic dataset, trained replicas.

Everything is session-scoped and built through the real nnU-Net commands once per test run. Tests that need
trained replicas take ``seed_replicas`` (three ``nnUNetTrainerTiny_seed<K>`` on fold 0 of a 3D dataset).
This file also enforces the test tiers (``unit``, ``nnunet``, ``e2e``): see "test tiers" below.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

BIN = os.path.dirname(sys.executable)
SYNTHETIC_3D_ID = 101
TINY = "nnUNetTrainerTiny"


def side_by_side_env(env=None) -> dict:
    """The environment for a command that trains two models at once on this machine (``--devices``, SLURM's local
    executor). nnUNetv2_train sets torch to one thread per core whatever OMP_NUM_THREADS says; two such processes
    with OpenMP's spinning idle threads ran 9.5x slower than one alone, with sleeping ones (OMP_WAIT_POLICY=PASSIVE)
    1.5x; alone, PASSIVE is 1.6x slower, so only these commands get it (benchmarks/bench_omp_wait.py)."""
    return dict(os.environ if env is None else env, OMP_WAIT_POLICY="PASSIVE")


def run_cli(*args: str, env=None, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``nnUNetv2_*`` or ``nnunet_varaug``), capturing its output."""
    exe = os.path.join(BIN, args[0])
    proc = subprocess.run([exe, *args[1:]], env=env or os.environ.copy(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def run_clis_side_by_side(*commands: tuple, envs=None, timeout: int = 900) -> list:
    """Run several console-script commands (argument tuples) at once, each as :func:`run_cli` would, with
    :func:`side_by_side_env` (or ``envs[i]`` passed through it); the completed processes in the given order. The
    commands' single-threaded start-ups (imports, nnU-Net's worker boot) overlap: on this 2-core machine two
    trainings side by side take about 1.5x one alone instead of 2x."""
    from concurrent.futures import ThreadPoolExecutor

    envs = envs or [None] * len(commands)
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = [pool.submit(run_cli, *c, env=side_by_side_env(e), timeout=timeout) for c, e in zip(commands, envs)]
        return [f.result() for f in futures]


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """nnU-Net's folders in a temporary place, the plugin on nnUNet_extTrainer, CPU-friendly settings."""
    from nnunet_varaug.training.registry import ext_trainer_value

    root = tmp_path_factory.mktemp("nnunet")
    values = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "f",
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: OpenMP threads sleep when idle
        values["OMP_WAIT_POLICY"] = "PASSIVE"  # (see side_by_side_env)
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(values[v], exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        mp.setenv("nnUNet_extTrainer", ext_trainer_value(""))
        yield values


def plan_and_preprocess(dataset_id: int, configurations=("3d_fullres",)) -> None:
    env = os.environ.copy()
    env["nnUNet_n_proc_DA"] = "1"  # planning fails with 0
    run_cli("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "1", "-npfp", "1",
            env=env)


@pytest.fixture(scope="session")
def synthetic_3d(nnunet_env):
    """Dataset101: 10 synthetic 32^3 cases (+2 test cases in imagesTs/labelsTs), planned and preprocessed."""
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    folder = make_synthetic_dataset(SYNTHETIC_3D_ID, num_cases=10, num_test_cases=2, seed=1)
    plan_and_preprocess(SYNTHETIC_3D_ID)
    return {"id": SYNTHETIC_3D_ID, "name": os.path.basename(folder), "raw": folder, "configuration": "3d_fullres"}


@pytest.fixture(scope="session")
def seed_replicas(synthetic_3d):
    """Three tiny seed replicas (nnUNetTrainerTiny_seed0..2) of Dataset101 3d_fullres fold 0, trained on the CPU
    through ``nnunet_varaug replicas --devices 0,1``: two at a time, one process per "device" (``-device cpu``
    ignores CUDA_VISIBLE_DEVICES; tests/launch/test_runner.py reads the launcher's logs of this run)."""
    proc = run_cli("nnunet_varaug", "replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0",
                   "-n", "3", "-tr", TINY, "-device", "cpu", "--devices", "0,1", env=side_by_side_env())
    results = os.path.join(os.environ["nnUNet_results"], synthetic_3d["name"])
    return {**synthetic_3d, "fold": 0, "base": TINY, "n": 3, "results": results,
            "names": [f"{TINY}_seed{k}" for k in range(3)], "replicas_stdout": proc.stdout}


def device_span(log_path: str) -> tuple:
    """``(device, start, end)`` of the training that a one-per-device launcher logged in ``log_path``: the
    CUDA_VISIBLE_DEVICES its process saw and the first start and end markers' times ("YYYY-mm-dd HH:MM:SS", so
    they compare as strings). The training must have ended with exit 0 and nnU-Net's "Training done."."""
    import re

    with open(log_path) as f:
        log = f.read()
    start = re.search(r"^# nnunet_varaug: (\S+ \S+) start CUDA_VISIBLE_DEVICES=([^\s:]*)", log, re.M)
    end = re.search(r"^# nnunet_varaug: (\S+ \S+) end exit=0$", log, re.M)
    assert start and end and "Training done." in log, log[-2000:]
    return start.group(2), start.group(1), end.group(1)


def trainer_in_process(trainer, dataset: str, fold: int, configuration: str = "3d_fullres", plans_edit=None):
    """``trainer`` (a class, or a name the plugin's registry resolves) for ``dataset``'s nnUNetPlans, built as
    nnUNetv2_train builds it (``continue_training`` False in the plans, CPU), not initialised. ``plans_edit``
    changes the plans first."""
    import json

    import torch

    from nnunet_varaug.training.registry import resolve

    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    with open(os.path.join(base, "nnUNetPlans.json")) as f:
        plans = {**json.load(f), "continue_training": False}
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    if plans_edit is not None:
        plans_edit(plans)
    cls = resolve(trainer) if isinstance(trainer, str) else trainer
    return cls(plans, configuration, fold, dataset_json, device=torch.device("cpu"))


@contextlib.contextmanager
def weights_of(checkpoint: str, donor: str):
    """``checkpoint`` (a replica's checkpoint_final.pth) carries ``donor``'s network weights inside the block, as if
    the replica had been trained again; its original bytes (and so its sha256) are back afterwards."""
    import torch

    with tempfile.TemporaryDirectory() as keep:
        original = os.path.join(keep, "checkpoint.pth")
        shutil.copy2(checkpoint, original)
        try:
            content = torch.load(checkpoint, map_location="cpu", weights_only=False)
            content["network_weights"] = torch.load(donor, map_location="cpu", weights_only=False)["network_weights"]
            torch.save(content, checkpoint)
            yield
        finally:
            shutil.copy2(original, checkpoint)


# ---- test tiers ------------------------------------------------------------------------------------------------------
# Every test belongs to one tier (pytest markers registered in pyproject.toml):
#   unit   needs no nnU-Net data: no nnU-Net fixture, no nnUNetv2_* command, no training; must be fast;
#   nnunet needs a planned and preprocessed dataset (or nnU-Net's folders), trains nothing;
#   e2e    trains models.
# The tiers are enforced, not trusted:
# * at collection, a test's tier is at least the tier of the fixtures it uses, directly or through other fixtures
#   (NNUNET_FIXTURES, TRAINING_FIXTURES). A test marked with a lower tier, or with two tiers, stops the run with a
#   usage error naming it. An UNMARKED test gets the tier of its fixtures (unit when it uses none of them), and the
#   marker is added so that `-m unit` / `-m "not e2e"` select it as what it is;
# * at run time, a test (with its fixtures' setup) below e2e that trains, through nnU-Net's trainer in this process
#   or a training command that succeeds in a child process (nnUNetv2_train, `nnunet_varaug replicas|benchmark|demo`),
#   fails; a unit test that starts any nnUNetv2_* command fails. A training command below e2e that exits non-zero
#   (bad input refused before anything ran) is allowed: it trained nothing.
TIERS = ("unit", "nnunet", "e2e")
NNUNET_FIXTURES = {"nnunet_env", "synthetic_3d", "region_ignore_dataset"}
TRAINING_FIXTURES = {"seed_replicas", "varaug_benchmark", "interrupted_replicas"}  # fixtures that train
TRAINING_COMMANDS = {"nnUNetv2_train"}
TRAINING_SUBCOMMANDS = {"replicas", "benchmark", "demo"}  # of nnunet_varaug


def fixture_tier(fixturenames) -> str:
    names = set(fixturenames)
    if names & TRAINING_FIXTURES:
        return "e2e"
    if names & NNUNET_FIXTURES:
        return "nnunet"
    return "unit"


def item_tier(item) -> str:
    return next((t for t in TIERS if item.get_closest_marker(t) is not None), "unit")


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection, which must see the added markers
def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        marked = [t for t in TIERS if item.get_closest_marker(t) is not None]
        needed = fixture_tier(getattr(item, "fixturenames", ()))
        if len(marked) > 1:
            wrong.append(f"{item.nodeid}: marked {' and '.join(marked)}; a test has one tier")
        elif not marked:
            item.add_marker(getattr(pytest.mark, needed))
        elif TIERS.index(marked[0]) < TIERS.index(needed):
            fixtures = sorted(set(item.fixturenames) & (NNUNET_FIXTURES | TRAINING_FIXTURES))
            wrong.append(f"{item.nodeid}: marked {marked[0]} but uses {', '.join(fixtures)} (tier {needed})")
    if wrong:
        raise pytest.UsageError("test tiers (tests/conftest.py):\n  " + "\n  ".join(wrong))


#: Test files that share a session fixture too costly to make twice: pytest-xdist sends them to one worker.
SHARED_WORKER = {"tests/training/test_outoffold.py": "tests/e2e/test_benchmark.py"}  # the one benchmark run


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How ``.ci/test`` spreads the slower tiers over two pytest-xdist workers (``-n 2``): whole files, so that a
    file's module fixtures are made once; and the files of :data:`SHARED_WORKER` on one worker with the file they
    share a session fixture with (the benchmark run takes 5 minutes). Session fixtures that both workers use
    (``synthetic_3d``, ``seed_replicas``) are made once per worker."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return SHARED_WORKER.get(path, path)

    return FileScheduling(config, log)


_current = {"tier": None, "nodeid": None, "violations": []}


def _command_words(args) -> list:
    if isinstance(args, (str, bytes, os.PathLike)):
        args = str(args).split()
    words = [os.path.basename(str(a)) for a in list(args)[:3]]
    if words and words[0].startswith("python"):  # python -m nnunet_varaug.cli ...
        words = words[1:]
    return words


def _is_training(words: list) -> bool:
    if not words:
        return False
    if words[0] in TRAINING_COMMANDS:
        return True
    return words[0] in ("nnunet_varaug",) and len(words) > 1 and words[1] in TRAINING_SUBCOMMANDS


def _violation(message: str) -> None:
    _current["violations"].append(message)


class _TierGuardedPopen(subprocess.Popen):
    """subprocess.Popen that refuses, below the e2e tier, what the tier promises not to do (see above)."""

    def __init__(self, args, *a, **kw):
        tier = _current["tier"]
        words = _command_words(args)
        if tier == "unit" and words and words[0].startswith("nnUNetv2_"):
            self._child_created, self.returncode = False, None  # what Popen.__del__ reads
            raise AssertionError(f"{_current['nodeid']}: a unit test runs {words[0]}; mark it nnunet or e2e")
        self._varaug_training = tier in ("unit", "nnunet") and _is_training(words)
        self._varaug_words = " ".join(words)
        super().__init__(args, *a, **kw)

    def wait(self, timeout=None):
        code = super().wait(timeout)
        if getattr(self, "_varaug_training", False) and code == 0:
            self._varaug_training = False
            _violation(f"`{self._varaug_words} ...` trained (exit 0) in a {_current['tier']} test; mark it e2e")
        return code


def _guard_in_process_training() -> None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    original = nnUNetTrainer.run_training

    def run_training(self, *a, **kw):
        if _current["tier"] in ("unit", "nnunet"):
            raise AssertionError(f"{_current['nodeid']}: a {_current['tier']} test trains "
                                 f"({type(self).__name__}.run_training); mark it e2e")
        return original(self, *a, **kw)

    nnUNetTrainer.run_training = run_training


def pytest_configure(config):
    subprocess.Popen = _TierGuardedPopen
    _guard_in_process_training()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The tier of the test being set up, run and torn down (fixtures set up for it included)."""
    _current.update(tier=item_tier(item), nodeid=item.nodeid, violations=[])
    yield
    _current.update(tier=None, nodeid=None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _current["violations"] and report.passed and call.when in ("setup", "call"):
        report.outcome = "failed"
        report.longrepr = f"test tier {_current['tier']} broken:\n  " + "\n  ".join(_current["violations"])
        _current["violations"] = []


# ---- one benchmark for tests/e2e/test_benchmark.py and tests/training/test_outoffold.py (issue 14) ------------------------------
# A Task04_Hippocampus-like task (10 training cases) converted to id 904 and benchmarked once with everything on:
# a held-out test split (0.2: 2 cases), 2 folds (a 2-fold splits_final.json, written by the benchmark before any
# training; nnU-Net uses an existing splits file), 2 tiny replicas on each fold, in-fold and out-of-fold sample sets
# and their varaug models, and 2 seed replicas of each varaug model (--stability).
BENCH_ID = 904
BENCH_DATASET = f"Dataset{BENCH_ID:03d}_Hippocampus"
BENCH_FLAGS = ("-n", "2", "-tr", TINY, "-device", "cpu", "-np", "1", "--folds", "2",
               "--sources", "in-fold", "out-of-fold", "--stability")


def bench_args(msd: str, out: str, *extra: str) -> tuple:
    """The benchmark command of the shared fixture (rerun it with the same flags to continue or check it)."""
    return ("nnunet_varaug", "benchmark", "--msd", msd, *BENCH_FLAGS, "-o", out, *extra)


@pytest.fixture(scope="session")
def varaug_benchmark(nnunet_env, tmp_path_factory):
    """The benchmark above, run once through the command line; its state, evaluation and results.md."""
    import json
    import time

    from nnunet_varaug.experiments.datasets import make_msd_task

    root = tmp_path_factory.mktemp("bench")
    msd = make_msd_task(str(root / "msd"), "Task04_Hippocampus", num_cases=10, num_test=2, seed=4, macos_junk=True)
    out = str(root / "out")
    start = time.monotonic()
    # --devices: the two replicas of a fold train side by side (one process per "device"; -device cpu ignores it)
    proc = run_cli(*bench_args(msd, out, "-d", str(BENCH_ID), "--devices", "0,1"), env=side_by_side_env(),
                   timeout=3600)
    seconds = time.monotonic() - start
    print(f"\nvaraug_benchmark fixture: {seconds:.0f} s")
    with open(os.path.join(out, "benchmark_state.json")) as f:
        state = json.load(f)
    with open(os.path.join(out, "evaluation", "dice.json")) as f:
        dice = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        results = f.read()
    return {"msd": msd, "out": out, "root": root, "proc": proc, "state": state, "dice": dice, "results": results,
            "seconds": seconds, "dataset": BENCH_DATASET, "id": BENCH_ID}


_SESSION_START = {}


def _cpu_seconds() -> float:
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def pytest_sessionstart(session):
    import time

    _SESSION_START.update(wall=time.monotonic(), cpu=_cpu_seconds())


def pytest_terminal_summary(terminalreporter):
    """The session's wall time beside the CPU time of this process and every process it waited for: their ratio is
    how many of the machine's cores the suite kept busy (docs/performance.md)."""
    import time

    if "wall" not in _SESSION_START:
        return
    wall, cpu = time.monotonic() - _SESSION_START["wall"], _cpu_seconds() - _SESSION_START["cpu"]
    terminalreporter.write_line(f"suite: {wall:.0f} s wall, {cpu:.0f} s CPU of this process and the processes it "
                                f"waited for ({cpu / max(wall, 1e-9):.2f} cores busy on average, "
                                f"{os.cpu_count()} on this machine)")
