"""Files on disk: atomic writes, content fingerprints, an array read back from an ``.npz`` file.

Writes go to a temporary file beside the target, then ``os.replace`` it into place: readers never see half a
file, and an interrupted write leaves the old file (or none) where it was. ``replacing`` is that pattern for any
writer that takes a file name (blosc2, SimpleITK, torch.save, nnU-Net's exporters); ``write_text`` and
``write_json`` use it for text. The temporary name is unique per
process and call, and keeps the default permissions (unlike ``tempfile.mkstemp``'s 0600). Fingerprints (sha256)
tie sample sets and cached predictions to the exact checkpoints they came from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Iterator


def temporary_name(path: str, suffix: str = ".tmp") -> str:
    """A unique name in ``path``'s folder for a file that will replace ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary name beside ``path``; rename it to ``path`` when the block ends without an error.

    If the block raises (or writes nothing), ``path`` is left as it was and the temporary file is removed. Give
    ``suffix`` the ending a writer needs to pick its format (``".nii.gz"``, ``".b2nd"``).

    Example:
        >>> with replacing("case.nii.gz", ".nii.gz") as tmp:  # doctest: +SKIP
        ...     sitk.WriteImage(image, tmp)
    """
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, content, indent: int = 2) -> None:
    """Write ``content`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(content, indent=indent) + "\n")


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """The sha256 of a file's content, read in blocks (checkpoints can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def read_npz_array(path: str, key: str):
    """The array ``key`` of the ``.npz`` file ``path``, or None where there is no such file."""
    import numpy as np

    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        return f[key]
