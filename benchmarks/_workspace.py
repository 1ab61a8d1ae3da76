"""The scratch folder of a benchmark that builds its own nnU-Net dataset: ``--keep DIR`` (kept), or a temporary
folder removed at the end; nnUNet_raw, nnUNet_preprocessed and nnUNet_results inside it.

A benchmark is run as ``python benchmarks/<name>.py``, so this folder is first on ``sys.path`` and the scripts import
this module as ``from _workspace import ...``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Dict, Iterator, Optional


def nnunet_folders(root: str) -> Dict[str, str]:
    """nnU-Net's three folders under ``root``: ``raw``, ``pre`` and ``results``."""
    return {"nnUNet_raw": os.path.join(root, "raw"), "nnUNet_preprocessed": os.path.join(root, "pre"),
            "nnUNet_results": os.path.join(root, "results")}


@contextlib.contextmanager
def workspace(keep: Optional[str], prefix: str) -> Iterator[str]:
    """The folder ``keep``, or a new temporary one (``prefix``) removed on leaving, with nnU-Net's folders made."""
    root = keep or tempfile.mkdtemp(prefix=prefix)
    try:
        for folder in nnunet_folders(root).values():
            os.makedirs(folder, exist_ok=True)
        yield root
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
