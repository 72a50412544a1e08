"""The target's weights while exporting: fp32 for tracing, one copy at a time, freed once written.

The graphs are traced in fp32 whatever dtype the checkpoint loads in (fp16 graphs are converted from
them later). The exporter writes a graph's initializers from the module's own tensors (its constant
folding transposes them as views), so the fp32 model is the one full copy an export holds; what is
done here keeps it so: Q/K/V are joined once up front instead of folded into a second copy, and the
weights of a graph already written are freed before the next graph is traced.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterable

import torch
from torch import nn


def prepare_for_tracing(model: nn.Module, decoder) -> None:
    """Convert `model` to fp32 in place, tensor by tensor, and join `decoder`'s Q/K/V weights."""
    model.float()  # per tensor: each narrower original is dropped as soon as its fp32 copy exists
    decoder.join_qkv()


def release(modules: Iterable[nn.Module], keep: Iterable[nn.Module] = ()) -> int:
    """Free the parameters and buffers of `modules` (but not those of `keep`): their graph is written.

    Returns the bytes freed. The modules cannot run afterwards.
    """
    kept = {id(t) for m in keep for t in (*m.parameters(), *m.buffers())}
    freed = 0
    with torch.no_grad():
        for m in modules:
            for t in (*m.parameters(), *m.buffers()):
                if id(t) in kept or t.numel() == 0:
                    continue
                freed += t.numel() * t.element_size()
                t.data = torch.empty(0, dtype=t.dtype)
    gc.collect()
    _return_to_os()
    return freed


def _return_to_os() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it for reuse otherwise, so the process's
    resident size would not fall); a no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
