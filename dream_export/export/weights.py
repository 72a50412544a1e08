"""The target's weights while exporting: fp32 for tracing, one copy at a time, freed once written.

The graphs are traced in fp32 whatever dtype the checkpoint loads in (fp16 graphs are converted from
them later). The exporter writes a graph's initializers from the module's own tensors (its constant
folding transposes them as views), so the fp32 weights are the one full copy an export holds; what is
done here keeps it so: the decoder layers turn fp32 only after the vision graph is written and the
vision tower freed, Q/K/V are joined once up front instead of folded into a second copy, and the
layers are freed once the target graph is written.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterable

import torch
from torch import nn


def to_fp32(model: nn.Module, skip: Iterable[nn.Module] = ()) -> None:
    """Convert `model`'s floating parameters and buffers to fp32 in place, tensor by tensor (as
    `Module.float()` does: each narrower original is dropped as soon as its fp32 copy exists), except those
    of the `skip` modules, which stay as loaded (a memory-mapped checkpoint's pages are not even read)."""
    skipped = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    with torch.no_grad():
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                if id(p) not in skipped and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            for name, b in mod.named_buffers(recurse=False):
                if id(b) not in skipped and b.is_floating_point() and b.dtype != torch.float32:
                    mod._buffers[name] = b.float()


def prepare_decoder(decoder) -> None:
    """The target graph's turn: `decoder`'s layers to fp32 and their Q/K/V joined, one layer at a time."""
    to_fp32(decoder.lm.layers)
    decoder.join_qkv()
    _return_to_os()  # the separate Q/K/V weights just freed


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


def unmap_freed_tensors() -> None:
    """From now on, allocate every block of 1 MiB or more with its own mapping (glibc `M_MMAP_THRESHOLD`),
    so a freed tensor leaves the process at once. By default glibc raises that threshold to the size of
    the blocks it has seen freed (up to 32 MiB), after which weight-sized temporaries (the exporter's
    per-node shape inference copies them) land in the heap, whose freed holes stay resident: about 0.5 B
    per parameter more at the peak of a 1B export. A no-op where the C library has no `mallopt`."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _return_to_os() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it for reuse otherwise, so the process's
    resident size would not fall); a no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
