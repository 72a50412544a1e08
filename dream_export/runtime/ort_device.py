"""Runtime caches kept in device memory for ONNX Runtime's CUDA / TensorRT execution providers.

A cache bound as a host numpy buffer is copied to the GPU by ONNX Runtime on every call that reads
it. Kept as a device `OrtValue` instead, it is uploaded once; the rows a call commits are then written
into the device copy in place by a one-node ScatterElements graph whose output is bound to the cache's
own device buffer (ScatterElements copies its input to its output only when they differ, so the call
writes just the new rows), and into the host buffer as before.

The model bytes are written here by hand (a few protobuf fields) because the runtime does not depend
on the `onnx` package; the tests check them with `onnx.checker`.
"""

from __future__ import annotations

import numpy as np

# Providers that run on an NVIDIA GPU and take `OrtValue`s allocated on "cuda".
DEVICE_PROVIDERS: dict[str, str] = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
# ONNX TensorProto element types of the buffers the runtime registers
_ELEM_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.int64): 7}


def cache_device(providers: list[str]) -> str:
    """Where a session on `providers` wants resident caches: "cuda" when its first provider runs on an
    NVIDIA GPU, "cpu" otherwise (the CPU provider reads numpy buffers in place)."""
    return DEVICE_PROVIDERS.get(providers[0], "cpu") if providers else "cpu"


# ---- a minimal protobuf writer (wire types 0: varint, 2: length-delimited) --------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _msg(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: list[str]) -> bytes:
    shape = b"".join(_msg(1, _msg(2, d)) for d in dims)  # TensorShapeProto.dim { dim_param }
    tensor = _int(1, elem_type) + _msg(2, shape)  # TypeProto.Tensor { elem_type, shape }
    return _msg(1, name) + _msg(2, _msg(1, tensor))  # ValueInfoProto { name, type { tensor_type } }


def scatter_rows_model(rank: int, axis: int, dtype=np.float32) -> bytes:
    """ONNX model bytes of `out = ScatterElements(data, indices, updates, axis)` (opset 16), all inputs
    of rank `rank` with symbolic dims: writes `updates` into `data` at `indices` along `axis`."""
    elem = _ELEM_TYPES[np.dtype(dtype)]
    dims = [f"d{i}" for i in range(rank)]
    rows = [f"r{i}" if i == axis else f"d{i}" for i in range(rank)]
    attr = _msg(1, "axis") + _int(3, axis) + _int(20, 2)  # AttributeProto { name, i, type: INT }
    node = (_msg(1, "data") + _msg(1, "indices") + _msg(1, "updates") + _msg(2, "out") + _msg(3, "scatter")
            + _msg(4, "ScatterElements") + _msg(5, attr))
    graph = (_msg(1, node) + _msg(2, "write_rows") + _msg(11, _value_info("data", elem, dims))
             + _msg(11, _value_info("indices", 7, rows)) + _msg(11, _value_info("updates", elem, rows))
             + _msg(12, _value_info("out", elem, dims)))
    opset = _msg(1, "") + _int(2, 16)
    return _int(1, 8) + _msg(7, graph) + _msg(8, opset)  # ModelProto { ir_version 8, graph, opset_import }


class ResidentBuffers:
    """Device copies of runtime-owned host buffers, uploaded once and written in place row by row."""

    def __init__(self, ort, device: str, providers: list[str], device_id: int = 0):
        self._ort, self.device, self.device_id, self._providers = ort, device, device_id, providers
        self._values: dict[int, tuple[np.ndarray, object]] = {}  # id(host array) -> (array, device OrtValue)
        self._writers: dict[tuple[int, int, np.dtype], object] = {}

    def value(self, array: np.ndarray):
        """The device OrtValue of `array` (uploaded on the first request; the same one afterwards)."""
        entry = self._values.get(id(array))
        if entry is None or entry[0] is not array:
            entry = (array, self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id))
            self._values[id(array)] = entry
        return entry[1]

    def holds(self, array: np.ndarray) -> bool:
        """Whether `array` has a device copy here."""
        entry = self._values.get(id(array))
        return entry is not None and entry[0] is array

    def write_rows(self, array: np.ndarray, axis: int, start: int, values: np.ndarray) -> None:
        """Write `values` at `start` along `axis` into `array`'s device copy, in place."""
        if not self.holds(array) or values.shape[axis] == 0:
            return
        dev = self._values[id(array)][1]
        key = (array.ndim, axis, array.dtype)
        sess = self._writers.get(key)
        if sess is None:
            so = self._ort.SessionOptions()
            so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = self._writers[key] = self._ort.InferenceSession(scatter_rows_model(array.ndim, axis, array.dtype),
                                                                   so, providers=self._providers)
        shape = [1] * values.ndim
        shape[axis] = values.shape[axis]
        index = np.broadcast_to((start + np.arange(values.shape[axis], dtype=np.int64)).reshape(shape), values.shape)
        binding = sess.io_binding()
        binding.bind_ortvalue_input("data", dev)
        binding.bind_cpu_input("indices", np.ascontiguousarray(index))
        binding.bind_cpu_input("updates", np.ascontiguousarray(values, dtype=array.dtype))
        # the output is the cache's own device buffer: only the scattered rows are written
        binding.bind_output("out", self.device, self.device_id, array.dtype, list(array.shape), dev.data_ptr())
        sess.run_with_iobinding(binding)
