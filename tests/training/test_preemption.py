"""Preemption-safe replicas: the checkpoint written atomically with a stop signal held until it is complete, each
epoch's random state a function of (replica, epoch), and a replica stopped by SIGTERM then continued with --c
ending bitwise identical to one never stopped, with augmentation workers."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import SYNTHETIC_3D_ID, run_cli, side_by_side_env
from nnunet_varaug.training.preemption import (CONTINUING, STOPPED_EXIT_CODE, PreemptibleTrainingMixin,
                                               restart_epoch_randomness)
from nnunet_varaug.training.registry import ext_trainer_value
from nnunet_varaug.training.seeding import SeededWorkerLoader, derive_seed
from pausing_trainer import PAUSING_TRAINER


class FakeBase:
    """What the mixin calls on nnU-Net's trainer; save_checkpoint writes in two parts and can signal itself between."""

    signal_midway = None

    def __init__(self, folder):
        self.output_folder, self.current_epoch, self.logged = str(folder), 0, []
        self.dataloader_train = self.dataloader_val = None

    def print_to_log_file(self, *args):
        self.logged.append(" ".join(str(a) for a in args))

    def on_train_start(self):
        pass

    def save_checkpoint(self, filename):
        with open(filename, "wb") as f:
            f.write(b"first half;")
            f.flush()
            if self.signal_midway is not None:
                os.kill(os.getpid(), self.signal_midway)
                time.sleep(0.2)  # the handler runs here, in the middle of the write
            f.write(b"second half")


class Trainer(PreemptibleTrainingMixin, FakeBase):
    pass


@pytest.mark.unit
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_during_a_checkpoint_waits_for_the_complete_file(tmp_path, sig):
    trainer = Trainer(tmp_path)
    before = signal.getsignal(sig)
    trainer.on_train_start()
    trainer._varaug_stop.exit = sys.exit  # the real one ends the process at once (os._exit): here, this test's
    try:
        assert trainer.save_every == 1
        trainer.current_epoch = 2
        trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))  # no signal: written, nobody exits
        trainer.signal_midway = sig
        trainer.current_epoch = 3
        with pytest.raises(SystemExit) as stopped:
            trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    finally:
        trainer._varaug_stop.uninstall()
    assert stopped.value.code == STOPPED_EXIT_CODE
    assert (tmp_path / "checkpoint_latest.pth").read_bytes() == b"first half;second half"
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"], "no temporary file left behind"
    assert f"{signal.Signals(sig).name} received; checkpoint_latest.pth holds epochs 0-3" in trainer.logged[-1]
    assert signal.getsignal(sig) is before, "the handlers are the process's own again after training"


@pytest.mark.unit
def test_a_stop_signal_between_checkpoints_exits_at_once_and_names_the_kept_epochs(tmp_path):
    trainer = Trainer(tmp_path)
    trainer.current_epoch = 4  # continued from a checkpoint holding epochs 0-3
    trainer.on_train_start()
    trainer._varaug_stop.exit = sys.exit
    assert trainer.logged == [f"{CONTINUING} 4"]
    try:
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        trainer._varaug_stop.uninstall()
    assert "holds epochs 0-3" in trainer.logged[-1] and "continues at epoch 4" in trainer.logged[-1]


class FakeLoader:
    """nnU-Net's data loader as SeededWorkerLoader sees it: a batch draws from numpy's global generator."""

    transforms = None

    def __next__(self):
        return float(np.random.rand())

    def set_thread_id(self, thread_id):
        pass


class FakeWorkers:
    """batchgenerators' MultiThreadedAugmenter as restart_streams sees it: restart() starts fresh workers."""

    def __init__(self, seed):
        self.generator, self.num_processes, self.seeds, self.restarts = SeededWorkerLoader(FakeLoader(), seed), 3, [], 0

    def restart(self):
        self.restarts += 1


@pytest.mark.unit
def test_each_epoch_seeds_the_generators_and_restarts_the_streams_from_replica_and_epoch():
    """The training process's generators and each augmenter's streams at epoch 7 of replica 5 are a function of
    (5, 7) alone: whatever was drawn before, the same numbers come next."""
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    class T:
        replica_seed, current_epoch = 5, 7
        dataloader_train, dataloader_val = FakeWorkers(1), SingleThreadedAugmenter(SeededWorkerLoader(FakeLoader(), 2),
                                                                                   None)

    next(T.dataloader_val), next(T.dataloader_val), np.random.rand(3)  # draws an interruption would not have made
    restart_epoch_randomness(T)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed = derive_seed(5, "epoch", 7)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    workers = T.dataloader_train
    key = derive_seed(5, "augmenter", 0, "epoch", 7)
    assert workers.restarts == 1 and workers.generator.seed == key
    assert workers.seeds == [derive_seed(key, i) for i in range(3)]
    key = derive_seed(5, "augmenter", 1, "epoch", 7)  # no workers: the loader's sampling stream restarts in place
    expected = np.random.RandomState(derive_seed(0, "sampling", key, 0)).rand(2).tolist()
    assert [next(T.dataloader_val), next(T.dataloader_val)] == expected


def pausing_trainer_folder(tmp_path) -> str:
    """A folder for nnUNet_extTrainer with :data:`PAUSING_TRAINER`."""
    folder = tmp_path / "user_trainers"
    folder.mkdir(exist_ok=True)
    (folder / "pausing_tiny.py").write_text(PAUSING_TRAINER)
    return str(folder)


def final_weights(results: str, dataset: str, trainer: str) -> dict:
    path = os.path.join(results, dataset, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0", "checkpoint_final.pth")
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.e2e
def test_sigterm_then_continue_ends_as_an_uninterrupted_run_with_augmentation_workers(synthetic_3d, tmp_path):
    """With 2 augmentation workers: PausingTiny_seed3 stopped by SIGTERM after epoch 0 and continued with --c ends
    with the weights of nnUNetTrainerTiny_seed3 trained without a stop (side by side with it)."""
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_value(pausing_trainer_folder(tmp_path)),
               nnUNet_n_proc_DA="2")
    stopped, plain = str(tmp_path / "stopped"), str(tmp_path / "plain")
    pause = tmp_path / "pause"
    pause.mkdir()
    command = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), str(SYNTHETIC_3D_ID), "3d_fullres",
               "0", "-device", "cpu", "-tr"]
    reference_log = open(tmp_path / "reference.log", "w")
    reference = subprocess.Popen(command + ["nnUNetTrainerTiny_seed3"], env=side_by_side_env(
        dict(env, nnUNet_results=plain)), stdout=reference_log, stderr=subprocess.STDOUT)
    first_env = side_by_side_env(dict(env, nnUNet_results=stopped, VARAUG_TEST_PAUSE=str(pause)))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command + ["PausingTiny_seed3"], env=first_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not (pause / "PausingTiny_seed3.paused").exists() and first.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=60) == STOPPED_EXIT_CODE, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    assert "SIGTERM received; checkpoint_latest.pth holds epochs 0-0" in (tmp_path / "first.log").read_text()
    again = run_cli("nnUNetv2_train", str(SYNTHETIC_3D_ID), "3d_fullres", "0", "-device", "cpu", "-tr",
                    "PausingTiny_seed3", "--c", env=side_by_side_env(dict(env, nnUNet_results=stopped)))
    assert f"{CONTINUING} 1" in again.stdout
    assert reference.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference_log.close()
    a = final_weights(stopped, synthetic_3d["name"], "PausingTiny_seed3")
    b = final_weights(plain, synthetic_3d["name"], "nnUNetTrainerTiny_seed3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        "a replica stopped and continued must end bitwise identical to one never stopped"
