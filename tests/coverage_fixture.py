"""The demo VLM + draft exported with a small KV capacity, once per process: small enough that a long
prompt fills it within a fast test, with room for the paper's 32-node tree."""

from __future__ import annotations

from pathlib import Path

SMALL_CAPACITY, SMALL_TREE = 96, 32
_CACHE: dict[str, Path] = {}


def cached_small_demo_bundle(root: str | Path) -> Path:
    """Export the shipped demo models under `root` on the first call; the same bundle afterwards."""
    if "demo" not in _CACHE:
        from dream_export.export.bundle import ExportOptions, export_bundle

        demo = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
        out = Path(root) / "bundle"
        export_bundle(demo / "vlm", demo / "draft", out, ExportOptions(kv_capacity=SMALL_CAPACITY, max_tree=SMALL_TREE),
                      log=lambda _s: None)
        _CACHE["demo"] = out
    return _CACHE["demo"]
