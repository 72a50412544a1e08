"""The `Backend` interface every backend implements, and the buffers a backend can bind in place.

Kept apart from `backends.py` (which picks and builds backends, the TensorRT one included) so that
backend implementations import the interface without importing the factory that imports them.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from dream_export.runtime.bundle import GRAPHS

# TensorRT's IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment"
# (include/NvInferRuntime.h, 8.5.2 through release/10.3). CUDA's allocators return 256-aligned memory;
# numpy's do not (a large np.zeros sits 16 bytes past a page boundary).
BIND_ALIGNMENT = 256


def aligned_zeros(shape: tuple[int, ...], dtype=np.float32, alignment: int = BIND_ALIGNMENT) -> np.ndarray:
    """A zero-filled C-contiguous array whose data pointer is a multiple of `alignment` bytes.

    Runtime-owned caches allocated this way can be bound in place by every backend (TensorRT maps
    them into the device's address space and binds that address, which must be 256-byte aligned).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    # the view keeps `raw` alive through its .base chain
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def is_aligned(array: np.ndarray, alignment: int = BIND_ALIGNMENT) -> bool:
    """Whether `array`'s data pointer is a multiple of `alignment` bytes."""
    return array.ctypes.data % alignment == 0


class Backend:
    """Runs named graphs on numpy feeds; records time per graph for the stats."""

    name = "abstract"
    # graphs this backend can run; optional ones (draft_chain) are used only when listed here
    graphs: frozenset[str] = frozenset(GRAPHS)

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes_in: dict[str, int] = defaultdict(int)
        self.resident: dict[str, dict[str, np.ndarray]] = {}

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one graph. Inputs registered as resident are bound in place and not counted as copies."""
        t0 = time.perf_counter()
        out = self._run(graph, feeds, outputs)
        self.seconds[graph] += time.perf_counter() - t0
        self.calls[graph] += 1
        resident = self.resident.get(graph, {})
        self.bytes_in[graph] += sum(a.nbytes for n, a in feeds.items() if resident.get(n) is not a)
        return out

    def register_resident(self, graph: str, name: str, array: np.ndarray) -> None:
        """Declare a runtime-owned buffer (KV cache) that the backend binds in place on every call."""
        self.resident.setdefault(graph, {})[name] = array

    def write_rows(self, array: np.ndarray, axis: int, start: int, values: np.ndarray) -> None:
        """Write `values` into a registered buffer at `start` along `axis` (a call's committed rows).

        Backends that keep device copies of resident buffers override this to update them too; the
        host buffer is always written, so it stays what the next call reads on the CPU.
        """
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, start + values.shape[axis])
        array[tuple(index)] = values

    def _run(self, graph, feeds, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def reset_stats(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.bytes_in.clear()
