"""Resident caches for ONNX Runtime on a GPU: device copies only with a GPU provider, written in place.

No GPU here: the CPU provider runs the same row-writing graph and binding code (its "device" copy is the
host buffer itself), and the CPU path is checked to bind the numpy buffers exactly as before.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dream_export.errors import UsageError
from dream_export.runtime.backends import OnnxRuntimeBackend
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.ort_device import ResidentBuffers, cache_device, scatter_rows_model

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pragma: no cover
    from bundle_fixture import cached_tiny_bundle


def test_device_copies_only_when_a_gpu_provider_runs_first():
    assert cache_device(["CPUExecutionProvider"]) == "cpu"
    assert cache_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert cache_device(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert cache_device(["CPUExecutionProvider", "CUDAExecutionProvider"]) == "cpu"  # CPU placement wins
    assert cache_device([]) == "cpu"


@pytest.mark.parametrize("rank,axis,dtype", [(5, 3, np.float32), (4, 2, np.float32), (2, 0, np.float16)])
def test_row_writer_graph_is_valid_onnx(rank, axis, dtype):
    model = onnx.load_from_string(scatter_rows_model(rank, axis, dtype))
    onnx.checker.check_model(model, full_check=True)
    node = model.graph.node[0]
    assert node.op_type == "ScatterElements" and node.attribute[0].i == axis
    assert model.graph.input[0].type.tensor_type.elem_type == model.graph.output[0].type.tensor_type.elem_type


@pytest.mark.parametrize("shape,axis", [((3, 1, 2, 16, 4), 3), ((1, 2, 16, 4), 2)])
def test_rows_are_written_in_place_and_nothing_else(shape, axis):
    cache = np.full(shape, 7.0, np.float32)
    copies = ResidentBuffers(ort, "cpu", ["CPUExecutionProvider"])
    bound = copies.value(cache)
    assert copies.value(cache) is bound and copies.holds(cache) and not copies.holds(cache.copy())
    new_shape = list(shape)
    new_shape[axis] = 5
    rows = np.random.default_rng(0).standard_normal(new_shape).astype(np.float32)
    copies.write_rows(cache, axis, 9, rows)
    got = bound.numpy()
    assert np.array_equal(np.take(got, range(9, 14), axis=axis), rows)
    rest = np.delete(got, range(9, 14), axis=axis)
    assert (rest == 7.0).all()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return Bundle.open(cached_tiny_bundle(tmp_path_factory.mktemp("tiny")))


def test_cpu_backend_binds_the_host_buffers_as_before(bundle):
    backend = OnnxRuntimeBackend(bundle)
    assert backend._device_copies is None
    kv = np.zeros((2, 1, 2, 64, 16), np.float32)
    backend.register_resident("target", "past_key", kv)
    assert backend._bound[("target", "past_key")].data_ptr() == kv.ctypes.data  # no copy, the buffer itself
    rows = np.ones((2, 1, 2, 3, 16), np.float32)
    backend.write_rows(kv, 3, 4, rows)
    assert kv[:, :, :, 4:7].all() and not kv[:, :, :, :4].any() and not kv[:, :, :, 7:].any()


def test_device_resident_caches_need_a_gpu_provider(bundle):
    with pytest.raises(UsageError, match="need a provider that runs there"):
        OnnxRuntimeBackend(bundle, resident_device="cuda")
