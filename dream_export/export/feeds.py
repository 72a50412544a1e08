"""What both parity checks share: the test tree, its masks and depths, and a plain ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TREE_PARENTS = (-1, 0, 0, 1, 1, 2, 3, 5)  # a small EAGLE-style tree: root, two children, grandchildren …


def ancestors(parents) -> np.ndarray:
    """[N, N] bool: node i sees node j iff j is i or one of its ancestors."""
    n = len(parents)
    m = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        while p >= 0:
            m[i, p] = True
            p = parents[p]
    return m


def depths(parents) -> np.ndarray:
    """Each node's depth below the root (its position offset after the committed prefix)."""
    d = np.zeros(len(parents), np.int64)
    for i, p in enumerate(parents):
        d[i] = 0 if p < 0 else d[p] + 1
    return d


def ort_session(path: Path, threads: int):
    """A CPU ONNX Runtime session with `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
