"""Preemption-safe replica training: at most the epoch in progress lost to an interruption, and a run continued
with ``--c`` bitwise identical to one never interrupted.

A scheduler stops a job with SIGTERM (preemption, ``scontrol requeue``, the time limit) or warns it with SIGUSR2
(``--signal=B:USR2@N``, forwarded by the launcher); nnU-Net writes ``checkpoint_latest.pth`` only every 50
epochs and dies on either signal. :class:`PreemptibleTrainingMixin`, mixed into the seed and numerical replicas
(:mod:`nnunet_varaug.training.trainers.replica`), changes three things:

* **a checkpoint after every epoch**, nnU-Net's own ``checkpoint_latest.pth`` (``save_every = 1``), written to a
  temporary name and renamed, so the file on disk is always a complete checkpoint of the last completed epoch;
* **a clean exit on SIGTERM and SIGUSR2**: the trainer logs which epoch the checkpoint holds, stops its
  augmentation workers and exits at once with :data:`STOPPED_EXIT_CODE`; a signal that arrives while a checkpoint
  is being written waits for the rename;
* **each epoch's random state a function of (replica, epoch) alone**: at the start of every epoch python, numpy
  and torch are seeded from ``derive_seed(K, "epoch", e)`` and the augmenters' sampling and augmentation streams
  restart keyed by (K, augmenter, e) (:func:`~nnunet_varaug.training.seeding.restart_streams`; workers drop the
  batches they had prepared). nnU-Net stores no generator state in its checkpoints; with this, a run that
  continues at epoch e draws what an uninterrupted run draws from e on. K is the replica's "train" stream.

Without a signal, nothing else changes: same network, loss, data and schedule as the base trainer.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from nnunet_varaug.training.seeding import derive_seed, restart_streams, seed_everything
from nnunet_varaug.utilities.fileio import temporary_name

#: ``nnUNetv2_train``'s exit status after a stop signal (EX_TEMPFAIL: try again, with ``--c``).
STOPPED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
#: Written to the log when a run continues from a checkpoint; the launcher's tests read it.
CONTINUING = "nnunet_varaug: continuing from checkpoint_latest.pth at epoch"


def epoch_key(trainer) -> int:
    """The index of the stream that keys ``trainer``'s epochs: its "train" stream (``stream_seed``), else K."""
    stream_seed = getattr(trainer, "stream_seed", None)
    return int(stream_seed("train")) if stream_seed is not None else int(getattr(trainer, "replica_seed", 0))


def restart_epoch_randomness(trainer) -> None:
    """Seed python, numpy and torch for ``trainer``'s current epoch and restart its augmenters' sampling and
    augmentation streams with keys of that epoch (a worker's prepared batches are dropped)."""
    key, epoch = epoch_key(trainer), int(trainer.current_epoch)
    seed_everything(derive_seed(key, "epoch", epoch))
    for index, augmenter in enumerate((trainer.dataloader_train, trainer.dataloader_val)):
        restart_streams(augmenter, derive_seed(key, "augmenter", index, "epoch", epoch))


class _StopOnSignal:
    """SIGTERM/SIGUSR2 handlers for one training process: exit at once, or right after a checkpoint being
    written. A worker process forked from the trainer inherits the handlers and dies as it would have."""

    #: How the process ends: at once, without the interpreter's slow teardown (torch, threads), which under load
    #: took longer than SLURM's KillWait; the checkpoint on disk is complete and every log line is flushed first.
    exit = staticmethod(os._exit)

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.owner = os.getpid()
        self.saving = False
        self.pending: Optional[int] = None
        self.kept = int(trainer.current_epoch)  # epochs held by checkpoint_latest.pth
        self.previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (an in-process training in a thread)
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.pending = signum
        if not self.saving:
            self.stop()

    def stop(self) -> None:
        trainer, name, kept = self.trainer, signal.Signals(self.pending).name, self.kept
        trainer.print_to_log_file(
            f"nnunet_varaug: {name} received; checkpoint_latest.pth holds epochs 0-{kept - 1} (nnUNetv2_train ... "
            f"--c continues at epoch {kept}); exiting with {STOPPED_EXIT_CODE}" if kept else
            f"nnunet_varaug: {name} received before the first epoch ended: no checkpoint to continue from; "
            f"exiting with {STOPPED_EXIT_CODE}")
        for augmenter in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
            finish = getattr(augmenter, "_finish", None)
            if finish is not None:
                finish(timeout=2)
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit(STOPPED_EXIT_CODE)


class PreemptibleTrainingMixin:
    """Every epoch checkpointed, SIGTERM/SIGUSR2 answered with a clean exit, each epoch seeded from (replica,
    epoch): see the module docstring. The replica's key is its "train" stream (:func:`epoch_key`)."""

    _varaug_stop: Optional[_StopOnSignal] = None

    def on_train_start(self):
        super().on_train_start()
        self.save_every = 1  # after debug.json was written: nnU-Net's recorded settings stay the base trainer's
        if self.current_epoch > 0:
            self.print_to_log_file(f"{CONTINUING} {self.current_epoch}")
        self._varaug_stop = _StopOnSignal(self)
        self._varaug_stop.install()

    def run_training(self):
        try:
            super().run_training()
        finally:
            if self._varaug_stop is not None:
                self._varaug_stop.uninstall()

    def on_epoch_start(self):
        super().on_epoch_start()  # logs the epoch's start time first: the epoch time includes the restart
        restart_epoch_randomness(self)

    def save_checkpoint(self, filename: str) -> None:
        stop = self._varaug_stop
        if stop is not None:
            stop.saving = True
        tmp = temporary_name(filename)
        try:
            super().save_checkpoint(tmp)
            if os.path.isfile(tmp):
                os.replace(tmp, filename)
                if stop is not None and os.path.basename(filename) == "checkpoint_latest.pth":
                    stop.kept = int(self.current_epoch) + 1  # what nnU-Net stores as current_epoch
        finally:
            if os.path.isfile(tmp):
                os.remove(tmp)
            if stop is not None:
                stop.saving = False
        if stop is not None and stop.pending is not None:
            stop.stop()
