"""Voxel arrays in chunks of rows along the first spatial axis, so that no temporary is larger than one chunk.

Arrays are ``(C, X, ...)`` (a class or region axis first) or ``(X, ...)``; a chunk is a range of rows ``X[a:b]``
holding about :data:`CHUNK_VALUES` values. :class:`LabelMaps` holds the K label maps of one case, in memory or in a
raw file (then only one chunk of them is ever in memory).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

CHUNK_VALUES = 1 << 22
"""Values per chunk (16 MiB of float32): a few such temporaries at a time, whatever the image size."""


def row_chunks(shape: Sequence[int], channels: int = 1, values: int = CHUNK_VALUES) -> Iterator[Tuple[int, int]]:
    """``(a, b)`` row ranges over the first axis of a ``shape`` volume, each about ``values / channels`` voxels."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        yield 0, 0
        return
    row = max(1, int(np.prod(shape[1:], dtype=np.int64))) * max(1, channels)
    step = max(1, values // row)
    for a in range(0, shape[0], step):
        yield a, min(shape[0], a + step)


def add_into(total: np.ndarray, p: np.ndarray) -> None:
    """``total += p`` chunk by chunk (no temporary of p's size when p is a strided view)."""
    for a, b in row_chunks(total.shape[1:], total.shape[0]):
        total[:, a:b] += p[:, a:b]


class LabelMaps:
    """The K label maps of one case, added one by one and read back in row chunks.

    With ``path`` they live in a raw file (map ``k`` at byte ``k * map size``) and reading a chunk maps only that
    chunk, so the memory held is one chunk whatever K; without, a list of arrays in memory. ``dtype``: the maps'
    integer type (default: uint8, or uint16 when the first map holds labels above 255).
    """

    def __init__(self, path: Optional[str] = None, dtype=None) -> None:
        self.path = path
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.shape: Optional[Tuple[int, ...]] = None
        self.count = 0
        self.listed = []
        if path is not None:
            open(path, "wb").close()

    @property
    def map_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def append(self, segmentation: np.ndarray) -> None:
        seg = np.asarray(segmentation)
        if self.shape is None:
            self.shape = tuple(seg.shape)
            self.dtype = self.dtype or np.dtype(label_dtype(int(seg.max(initial=0))))
        if seg.shape != self.shape:
            raise ValueError(f"label map of shape {seg.shape}, expected {self.shape}")
        if seg.size and int(seg.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"label {int(seg.max())} does not fit {self.dtype}")
        if self.path is None:
            self.listed.append(seg.astype(self.dtype))
        else:
            with open(self.path, "r+b") as f:
                f.seek(self.count * self.map_bytes)
                for a, b in row_chunks(self.shape):
                    f.write(np.ascontiguousarray(seg[a:b], dtype=self.dtype).tobytes())
        self.count += 1

    def rows(self, a: int, b: int, members: Optional[Sequence[int]] = None) -> np.ndarray:
        """``(len(members), b - a, *shape[1:])``: rows a..b of the maps ``members`` (default all), a new array."""
        members = list(range(self.count)) if members is None else list(members)
        if self.path is None:
            return np.stack([self.listed[m][a:b] for m in members])
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count, *self.shape))
        try:
            return np.array(mm[members, a:b])
        finally:
            del mm

    def chunks(self, members: Optional[Sequence[int]] = None) -> Iterator[Tuple[int, int, np.ndarray]]:
        """``(a, b, rows a..b of the maps)`` over the whole volume, each chunk about :data:`CHUNK_VALUES` values."""
        n = self.count if members is None else len(members)
        for a, b in row_chunks(self.shape or (0,), n):
            yield a, b, self.rows(a, b, members)

    def remove(self) -> None:
        """Delete the file (the maps are gone)."""
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def label_dtype(max_label: int):
    """uint8 when every label fits, else uint16 (nnU-Net's own choice for segmentations)."""
    return np.uint8 if max_label < 256 else np.uint16
