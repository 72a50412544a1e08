"""TensorRT binds only 256-byte-aligned addresses (`setTensorAddress`, include/NvInferRuntime.h).

The TensorRT backend decides each input's address with `map_resident` (at registration) and
`input_addresses` (per call); these tests replay the calls the runtime really made (recorded on ONNX
Runtime) through those same functions, so they check the addresses the backend would bind.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dream_export.runtime.backend_base import BIND_ALIGNMENT
from dream_export.runtime.backends import aligned_zeros
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.trt_backend import buffer_of, check_alignment, input_addresses, map_resident
from dream_export.targets.coverage import DEFAULT_REQUESTS, record_calls

try:
    from tests.coverage_fixture import cached_small_demo_bundle
except ImportError:  # pragma: no cover
    from coverage_fixture import cached_small_demo_bundle


def _register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister(Mapped) + cudaHostGetDevicePointer: the mapping is page-granular, so the device
    address keeps the host address's offset within its page (equal to it under unified addressing)."""
    return ptr


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """(bundle, recorded calls, the recording backend with the runtime's registered caches)."""
    bundle = cached_small_demo_bundle(tmp_path_factory.mktemp("demo-small"))
    rec = []
    calls = record_calls(bundle, ["?", "Describe the picture in detail."], DEFAULT_REQUESTS, recorder=rec)
    return Bundle.open(bundle), calls, rec[0]


def _bound_addresses(bundle, calls, backend):
    """Per call, {input: address} as the TensorRT backend binds it (None: staged through cudaMalloc)."""
    dtypes = {g: {io["name"]: np.dtype(io["dtype"]) for io in bundle.graph(g)["inputs"]} for g in backend.graphs}
    mapped: dict[str, dict] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for graph, buffers in backend.resident.items():
            for name, array in buffers.items():
                address = map_resident(array, dtypes[graph][name], _register)
                if address is not None:
                    mapped.setdefault(graph, {})[name] = ((array.ctypes.data, array.nbytes), address)
    out = []
    for c in calls:
        feeds = {n: c.buffers[n] if np.dtype(c.dtypes[n]) == dtypes[c.graph][n] else None for n in c.shapes}
        out.append((c, input_addresses(list(dtypes[c.graph]), feeds, mapped.get(c.graph, {}))))
    return out, [str(w.message) for w in caught]


def test_every_address_the_backend_binds_for_recorded_calls_is_aligned(replay):
    bundle, calls, backend = replay
    bound, warned = _bound_addresses(bundle, calls, backend)
    assert len(bound) >= 200
    for call, addresses in bound:
        assert set(addresses) == set(call.shapes)
        for name, address in addresses.items():
            # None: copied into the backend's cudaMalloc buffer, which CUDA aligns to 256 bytes
            assert address is None or address % BIND_ALIGNMENT == 0, (call.graph, name, address)
    # a misaligned runtime cache is never bound: it is copied per call, and the user is told why
    misaligned = [a for bufs in backend.resident.values() for a in bufs.values() if a.ctypes.data % BIND_ALIGNMENT]
    assert len(warned) == len(misaligned)
    assert all("256-byte aligned" in w and "aligned_zeros" in w for w in warned)


def test_runtime_caches_are_bound_in_place(replay):
    bundle, calls, backend = replay
    bound, _ = _bound_addresses(bundle, calls, backend)
    for call, addresses in bound:
        for name in call.resident:
            assert addresses[name] is not None, (call.graph, name)


@pytest.mark.parametrize("shape,dtype", [((24, 1, 2, 96, 32), np.float32), ((3,), np.float16), ((5, 4), np.int64),
                                         ((2, 1, 2, 128, 32), np.float32)])
def test_aligned_zeros_is_aligned_contiguous_and_zero(shape, dtype):
    a = aligned_zeros(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % BIND_ALIGNMENT == 0 and not a.any()
    a[...] = 1  # its own memory: writes land in it
    assert a.sum() == a.size


def test_registered_buffers_bind_in_place_only_when_they_can():
    kv = aligned_zeros((4, 1, 2, 64, 8))
    assert map_resident(kv, np.dtype(np.float32), _register) == kv.ctypes.data
    assert map_resident(kv, np.dtype(np.float16), _register) is None  # cast per call instead
    assert map_resident(kv[:, :, :, ::2], np.dtype(np.float32), _register) is None  # not contiguous
    shifted = aligned_zeros((4 * 1 * 2 * 64 * 8 + 4,))[4:].reshape(kv.shape)  # 16 bytes past a boundary
    with pytest.warns(UserWarning, match="not 256-byte aligned"):
        assert map_resident(shifted, np.dtype(np.float32), _register) is None
    with pytest.raises(RuntimeError, match="256-byte aligned"):
        map_resident(kv, np.dtype(np.float32), lambda ptr, n: ptr + 16)  # a device address CUDA would never give


def test_a_call_binds_the_mapped_address_only_for_the_registered_memory():
    kv = aligned_zeros((2, 8, 16))
    mapped = {"past_key": ((kv.ctypes.data, kv.nbytes), 0x7000_0000)}
    f32 = np.dtype(np.float32)
    same = input_addresses(["past_key", "x"], {"past_key": buffer_of(kv, f32), "x": None}, mapped)
    assert same == {"past_key": 0x7000_0000, "x": None}
    copy = input_addresses(["past_key"], {"past_key": buffer_of(kv.copy(), f32)}, mapped)
    assert copy == {"past_key": None}  # other memory: staged, never the stale mapping
    assert input_addresses(["past_key"], {"past_key": buffer_of(kv, np.dtype(np.float16))}, mapped) == {"past_key": None}
    check_alignment("x", 0x7000_0000)
    with pytest.raises(RuntimeError, match="not 256-byte aligned"):
        check_alignment("target engine tensor past_key", 0x7000_0010)
