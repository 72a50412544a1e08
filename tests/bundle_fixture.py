"""A tiny real bundle for tests: tiny LLaVA target + random DREAM draft, exported with `export_bundle`.

Building one takes a few seconds, so `cached_tiny_bundle` keeps one per process (tests that modify a
bundle must copy it first).
"""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}

KV_CAPACITY = 64
MAX_TREE = 16


def make_tiny_bundle(tmp_dir: str | Path, family: str = "llava", kv_capacity: int = KV_CAPACITY) -> Path:
    """Build `tmp_dir/{target,draft,bundle}` and return the bundle directory.

    The target is a genuine HF model of `family` from `tests/tiny_vlms.py` (default LLaVA); the draft is a
    randomly initialised DREAM draft sized from the target's text config (so its features, LM head
    and KV shapes line up with the target's).
    """
    import torch
    from transformers import AutoConfig

    from dream_export.draft.config import DraftConfig
    from dream_export.draft.model import Draft, init_weights
    from dream_export.draft.train import save_draft
    from dream_export.export.bundle import ExportOptions, export_bundle

    try:
        from tests.tiny_vlms import build_tiny_vlm
    except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
        from tiny_vlms import build_tiny_vlm

    root = Path(tmp_dir)
    target_dir = build_tiny_vlm(family, root / "target")
    torch.manual_seed(0)
    draft = Draft(DraftConfig.from_target(AutoConfig.from_pretrained(target_dir).get_text_config()))
    init_weights(draft)
    # The tanh gates start at 0, which would make the cross-attention block invisible in the graphs'
    # outputs; open them so parity checks exercise that path too.
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith(("attn_gate", "mlp_gate")):
                p.fill_(0.5)
    save_draft(draft.eval(), root / "draft", record={})
    bundle = root / "bundle"
    export_bundle(target_dir, root / "draft", bundle, ExportOptions(kv_capacity=kv_capacity, max_tree=MAX_TREE),
                  log=lambda *_: None)
    return bundle


def cached_tiny_bundle(root: str | Path, family: str = "llava", kv_capacity: int = KV_CAPACITY) -> Path:
    """`make_tiny_bundle` once per process and family under `root` (e.g. a tmp_path_factory directory;
    families other than LLaVA go under `root/<family>`)."""
    if family not in _CACHE:
        _CACHE[family] = make_tiny_bundle(root if family == "llava" else Path(root) / family, family, kv_capacity)
    return _CACHE[family]
