"""One copy on disk of the weights two graphs share (a self-spec draft runs the target's first layers).

The owner graph (the target) keeps its initializers in an external-data file; every initializer of
the user graph (the draft) whose bytes, dtype and shape equal one of the owner's becomes a reference
into that same file (ONNX external data: location, offset, length), so ONNX Runtime and TensorRT's
parser read it from there and the bundle stores it once. Sharing by content, not by name: the
exporter names constant-folded weights per graph.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Initializers smaller than this stay inside their graph (norm scales, constants): not worth a reference.
MIN_SHARED_BYTES = 1024


def _key(tensor, raw: bytes) -> tuple:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest()


def share_initializers(owner: str | Path, user: str | Path) -> dict:
    """Move `owner`'s initializers to `<owner>.data` and point `user`'s identical ones into it.

    Both graphs must sit in one directory (references are relative to the graph file). Returns
    {"shared": initializers now referenced, "shared_bytes": their size, "data": the data file name}.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    owner, user = Path(owner), Path(user)
    if owner.parent != user.parent:
        raise ValueError(f"{owner} and {user} must be in one directory to share weights")
    data_name = owner.name + ".data"
    model = onnx.load(str(owner))  # with its external data, wherever the exporter put it
    old_files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    # the weights are in memory now; a data file of that name would be appended to, not replaced
    (owner.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(model, str(owner), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=MIN_SHARED_BYTES)
    for name in old_files - {data_name}:  # the exporter's own per-tensor files, now merged into one
        (owner.parent / name).unlink(missing_ok=True)
    del model
    index = {}
    blob = (owner.parent / data_name).read_bytes()
    for t in onnx.load(str(owner), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            off, n = int(info.get("offset", 0)), int(info["length"])
            index[_key(t, blob[off:off + n])] = (off, n)
    del blob
    draft = onnx.load(str(user))
    shared = shared_bytes = 0
    for t in draft.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        raw = numpy_helper.to_array(t).tobytes()
        hit = index.get(_key(t, raw)) if len(raw) >= MIN_SHARED_BYTES else None
        if hit is None:
            continue
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        t.raw_data = raw  # onnx sets external data only on raw tensors; the bytes then leave the graph
        set_external_data(t, location=data_name, offset=hit[0], length=hit[1])
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        shared += 1
        shared_bytes += hit[1]
    onnx.save_model(draft, str(user))
    return {"shared": shared, "shared_bytes": shared_bytes, "data": data_name}
