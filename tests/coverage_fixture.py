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


def cached_small_selfspec_bundle(root: str | Path, exit_layer: int = 6) -> Path:
    """The demo VLM with an (untrained, early-exit initialised) self-spec draft, exported like the above:
    its draft graph has the self-spec inputs (a K + 1 block self cache, no cross-attention)."""
    if "selfspec" not in _CACHE:
        from dream_export.draft.config import DraftConfig
        from dream_export.draft.selfspec import new_selfspec
        from dream_export.draft.target import load_target
        from dream_export.draft.train import save_draft
        from dream_export.export.bundle import ExportOptions, export_bundle

        demo = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
        target = load_target(demo / "vlm")
        cfg = DraftConfig.from_target(target.model.config.text_config, arch="self-spec", exit_layer=exit_layer)
        save_draft(new_selfspec(cfg, target.side.decoder).eval(), Path(root) / "draft", record={})
        out = Path(root) / "bundle"
        export_bundle(demo / "vlm", Path(root) / "draft", out,
                      ExportOptions(kv_capacity=SMALL_CAPACITY, max_tree=SMALL_TREE), log=lambda _s: None)
        _CACHE["selfspec"] = out
    return _CACHE["selfspec"]


def cached_small_eagle3_bundle(root: str | Path) -> Path:
    """The demo VLM with an (untrained) EAGLE-3 draft, exported like the above: the target graph outputs
    the layer taps and the draft graph reads them (`prev_taps`) beside its own features (`prev_feat`)."""
    if "eagle3" not in _CACHE:
        from dream_export.draft.config import DraftConfig
        from dream_export.draft.model import Draft, init_weights
        from dream_export.draft.target import load_target
        from dream_export.draft.train import save_draft
        from dream_export.export.bundle import ExportOptions, export_bundle

        demo = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
        cfg = DraftConfig.from_target(load_target(demo / "vlm").model.config.text_config, arch="eagle3")
        draft = Draft(cfg)
        init_weights(draft)
        save_draft(draft.eval(), Path(root) / "draft", record={})
        out = Path(root) / "bundle"
        export_bundle(demo / "vlm", Path(root) / "draft", out,
                      ExportOptions(kv_capacity=SMALL_CAPACITY, max_tree=SMALL_TREE), log=lambda _s: None)
        _CACHE["eagle3"] = out
    return _CACHE["eagle3"]
