"""nnU-Net's process pools run in this process, for jobs too small to pay for a worker.

nnU-Net calls ``multiprocessing.get_context("spawn").Pool(n)`` to export predictions (final validation) and to
score them (``compute_metrics_on_folder``). A spawned worker imports torch and nnU-Net again, 3 to 8 s on a small
CPU, to export or score a few tiny cases in milliseconds. :func:`pools_in_this_process` replaces the
``multiprocessing`` module of the given nnU-Net modules, while it is active, with a stand-in whose pool runs each
task at once, in order, in the calling process: the same functions on the same arguments, so the same files and
numbers; a task that fails raises where it is submitted instead of at ``get()``. Used by the benchmark's test-split
evaluation and by ``nnUNetTrainerTiny``'s final validation; not by any trainer meant for real data, where the
workers overlap export with prediction.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, List


class _Finished:
    """What ``Pool.starmap_async`` returns, for a result that is already there."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout=None) -> Any:
        return self._value


class SerialPool:
    """The parts of ``multiprocessing.Pool`` nnU-Net's validation and metrics use (the context manager, ``starmap``,
    ``starmap_async``, ``_pool``), without processes: ``_pool`` (the worker list nnU-Net's
    ``check_workers_alive_and_busy`` reads) is empty and every result is ready when submitted."""

    def __init__(self, *args, **kwargs) -> None:
        self._pool: List[Any] = []

    def __enter__(self) -> "SerialPool":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def starmap(self, function: Callable, iterable: Iterable) -> list:
        return [function(*arguments) for arguments in iterable]

    def starmap_async(self, function: Callable, iterable: Iterable) -> _Finished:
        return _Finished(self.starmap(function, iterable))


class SerialMultiprocessing:
    """Stands in for the ``multiprocessing`` module of an nnU-Net module: ``get_context(...)`` and ``Pool``."""

    Pool = SerialPool

    @staticmethod
    def get_context(method=None) -> "type[SerialMultiprocessing]":
        return SerialMultiprocessing


@contextlib.contextmanager
def pools_in_this_process(*modules) -> Iterator[None]:
    """Within the block, the pools that ``modules`` (nnU-Net modules that ``import multiprocessing``) create run
    in this process; their ``multiprocessing`` is restored afterwards, also on an exception."""
    originals = [module.multiprocessing for module in modules]
    for module in modules:
        module.multiprocessing = SerialMultiprocessing
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.multiprocessing = original
