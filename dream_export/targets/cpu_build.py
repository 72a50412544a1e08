"""`dream-export build --target cpu`: ONNX Runtime-optimized graphs saved into the bundle.

ONNX Runtime's graph optimizations (constant folding, fusions, layout changes) normally run at every
session start; saving the optimized model moves that work to build time, like an engine build does
for TensorRT. The graphs are registered as the bundle's `cpu` variant (`Pipeline.load(...,
precision="cpu")`, `--precision cpu`), with the session settings in `engines/cpu/build.json`.

The draft's graphs get 8-bit weights by default (`calib.weight_only`): a CPU draft step is bound by
streaming weights, and the target still verifies every drafted token, so answers do not change. The
target, vision tower and their numerics stay exactly as exported.

A graph whose weights live in an external-data file (a large target; a self-spec draft, whose shared
layers are read from the target's file) is saved with its own data file beside it in the build: the
optimizer writes references relative to where the graph is saved, so the exported file would not be
found there. A self-spec draft's CPU graph thus carries its own (8-bit) copy of the shared layers.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from dream_export.core.integrity import record
from dream_export.io import atomic_dir, atomic_write_text, file_digest

DRAFT_GRAPHS = ("draft", "draft_chain")


def _external_data(path: Path) -> bool:
    """Whether any initializer of the graph at `path` is stored in an external-data file."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def _self_contained(src: Path, dst: Path) -> Path:
    """`src` saved as `dst` with its external weights in `dst`'s own data file (for the quantizer, which
    reads the graph back from the directory it writes to)."""
    import onnx

    onnx.save_model(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return dst


def build_cpu(bundle_dir: str | Path, threads: int = 2, source_precision: str = "fp32", draft_int8: bool = True,
              log=print) -> dict:
    """Optimize every graph for this CPU with ONNX Runtime and register them as the `cpu` variant
    (`draft_int8`: the draft's linears with 8-bit weights)."""
    import onnxruntime as ort

    from dream_export.calib.weight_only import quantize_linear_weights
    from dream_export.runtime.bundle import GRAPHS, Bundle

    b = Bundle.open(bundle_dir)
    root = Path(bundle_dir)
    out_rel = Path("engines") / "cpu"
    plan = {"format": "dream-export-cpu-build", "target": "cpu", "onnxruntime": ort.__version__,
            "machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "session": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                        "graph_optimization_level": "ORT_ENABLE_ALL", "enable_mem_pattern": True,
                        "enable_cpu_mem_arena": True},
            "source_precision": source_precision, "draft_weights": None, "graphs": {}}
    with atomic_dir(root / out_rel) as tmp:
        # the optional chain graph too, so that a CPU build keeps one draft call per chain round
        names = [*GRAPHS, *(["draft_chain"] if b.chain_graph_usable(source_precision) else [])]
        for name in names:
            src = b.graph_path(name, source_precision)
            external = _external_data(src)
            scratch = []  # intermediate graphs (and their data files) of this build step
            if draft_int8 and name in DRAFT_GRAPHS:
                if external:
                    src = _self_contained(src, tmp / f"{name}.src.onnx")
                    scratch.append(src)
                q = quantize_linear_weights(src, tmp / f"{name}.int8.onnx")
                plan["draft_weights"] = {k: v for k, v in q.items() if k not in ("matmuls", "quantized")}
                src = tmp / f"{name}.int8.onnx"
                scratch.append(src)
                external = _external_data(src)
                log(f"{name}: {q['quantized']} of {q['matmuls']} linears with 8-bit weights")
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3  # the saved graph is for this CPU: that is the point, not a warning
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(tmp / f"{name}.onnx")
            if external:  # the built graph's weights in its own data file (see the module docstring)
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                            f"{name}.onnx.data")
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                            "1024")
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
            for path in scratch:
                path.unlink()
                Path(f"{path}.data").unlink(missing_ok=True)
            plan["graphs"][name] = {"file": str(out_rel / f"{name}.onnx"), "sha256": file_digest(tmp / f"{name}.onnx")}
            log(f"optimized {name} graph for this CPU")
        plan["files"] = record(tmp)  # what `check` verifies for this variant
        (tmp / "build.json").write_text(json.dumps(plan, indent=2))
    manifest = json.loads((root / "manifest.json").read_text())
    for name in names:
        manifest["graphs"][name].setdefault("variants", {})["cpu"] = plan["graphs"][name]
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
    return plan
