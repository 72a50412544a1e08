"""A calibrated bundle: a new bundle directory whose graphs are the converted ones.

The output is an ordinary bundle (the runtime loads it unchanged): for each converted component the
manifest's `graphs[name].file` points to the INT8 Q/DQ (`onnx-int8/`) or FP16 (`onnx-fp16/`) graph and
`precision[name]` says which; unconverted components keep their fp32 graphs. The fp32 graphs stay in
`onnx/` beside them, since implicit-INT8 TensorRT builds (`trtexec --int8 --calib`) start from them.
Engines, reports and precision variants of the source are not copied: they describe other graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dream_export.core.integrity import record
from dream_export.errors import UsageError
from dream_export.io import file_digest
from dream_export.runtime.bundle import GRAPHS, Bundle

_SKIP = ("engines", "reports", "calib")  # plus every onnx-* variant directory


def copy_base(src: Bundle, dst: Path) -> dict:
    """Copy everything but engines, reports and variant graphs from `src` into `dst`; returns the manifest."""
    for p in src.root.iterdir():
        if p.name in _SKIP or p.name.startswith("onnx-") or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
    manifest = json.loads(json.dumps(src.manifest))
    for entry in manifest["graphs"].values():
        entry.pop("variants", None)
    return manifest


def set_graph(manifest: dict, root: Path, name: str, rel: str, precision: str) -> None:
    """Point component `name` at graph file `rel` (relative to `root`) in `precision`."""
    entry = manifest["graphs"][name]
    entry["fp32_file"] = entry["file"]
    entry["file"] = rel
    entry["sha256"] = file_digest(root / rel)
    manifest.setdefault("precision", {})[name] = precision


def graph_bytes(root: Path, rel: str) -> int:
    """Bytes of a graph file plus its external-data file, if any."""
    p = root / rel
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def model_bytes(bundle: Bundle) -> dict[str, int]:
    """Bytes of the graph each component runs (what a device loads), per component and in total."""
    sizes = {g: graph_bytes(bundle.root, bundle.graph(g)["file"]) for g in GRAPHS}
    sizes["total"] = sum(sizes.values())
    return sizes


def parse_components(text: str | None) -> list[str]:
    """`target,draft` → ["target", "draft"]; `all` → every graph."""
    items = [c.strip() for c in (text or "").split(",") if c.strip()]
    if items == ["all"]:
        return list(GRAPHS)
    bad = [c for c in items if c not in GRAPHS]
    if bad or not items:
        raise UsageError(f"--components takes a comma list of {', '.join(GRAPHS)} (or all), got {text!r}")
    return [g for g in GRAPHS if g in items]


def default_out(bundle_dir: Path, precision: str) -> Path:
    """BUNDLE-int8 / BUNDLE-fp16 beside the source bundle."""
    bundle_dir = Path(bundle_dir).resolve()
    return bundle_dir.with_name(f"{bundle_dir.name}-{precision}")


def write_manifest(root: Path, manifest: dict) -> None:
    """Record every file's size and sha256 (as export does), then write the manifest."""
    manifest["files"] = record(root)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
