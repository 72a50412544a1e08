"""`dream-export build --target cpu`: ONNX Runtime-optimized graphs saved into the bundle.

ONNX Runtime's graph optimizations (constant folding, fusions, layout changes) normally run at every
session start; saving the optimized model moves that work to build time, like an engine build does
for TensorRT. The graphs are registered as the bundle's `cpu` variant (`Pipeline.load(...,
precision="cpu")`, `--precision cpu`), with the session settings in `engines/cpu/build.json`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from dream_export.io import atomic_dir, atomic_write_text, file_digest


def build_cpu(bundle_dir: str | Path, threads: int = 2, source_precision: str = "fp32", log=print) -> dict:
    """Optimize every graph for this CPU with ONNX Runtime and register them as the `cpu` variant."""
    import onnxruntime as ort

    from dream_export.runtime.bundle import GRAPHS, Bundle

    b = Bundle.open(bundle_dir)
    root = Path(bundle_dir)
    out_rel = Path("engines") / "cpu"
    plan = {"format": "dream-export-cpu-build", "target": "cpu", "onnxruntime": ort.__version__,
            "machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "session": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                        "graph_optimization_level": "ORT_ENABLE_ALL", "enable_mem_pattern": True,
                        "enable_cpu_mem_arena": True},
            "source_precision": source_precision, "graphs": {}}
    with atomic_dir(root / out_rel) as tmp:
        # the optional chain graph too, so that a CPU build keeps one draft call per chain round
        names = [*GRAPHS, *(["draft_chain"] if b.chain_graph_usable(source_precision) else [])]
        for name in names:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(tmp / f"{name}.onnx")
            ort.InferenceSession(str(b.graph_path(name, source_precision)), so, providers=["CPUExecutionProvider"])
            plan["graphs"][name] = {"file": str(out_rel / f"{name}.onnx"), "sha256": file_digest(tmp / f"{name}.onnx")}
            log(f"optimized {name} graph for this CPU")
        (tmp / "build.json").write_text(json.dumps(plan, indent=2))
    manifest = json.loads((root / "manifest.json").read_text())
    for name in names:
        manifest["graphs"][name].setdefault("variants", {})["cpu"] = plan["graphs"][name]
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
    return plan
