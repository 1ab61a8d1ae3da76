"""Files on disk: atomic writes and content fingerprints.

Writes go to a temporary file beside the target, then ``os.replace`` it into place: readers never see half a
file, and an interrupted write leaves the old file (or none) where it was. The temporary name is unique per
process and call, and keeps the default permissions (unlike ``tempfile.mkstemp``'s 0600). Fingerprints (sha256)
tie sample sets and cached predictions to the exact checkpoints they came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid


def temporary_name(path: str, suffix: str = ".tmp") -> str:
    """A unique name in ``path``'s folder for a file that will replace ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
