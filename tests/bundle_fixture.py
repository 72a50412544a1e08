"""A tiny real bundle for tests: tiny LLaVA target + random DREAM draft, exported with `export_bundle`.

Building one takes a few seconds, so `cached_tiny_bundle` keeps one per process (tests that modify a
bundle must copy it first).
"""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}

KV_CAPACITY = 64
MAX_TREE = 16


def make_tiny_bundle(tmp_dir: str | Path) -> Path:
    """Build `tmp_dir/{target,draft,bundle}` and return the bundle directory.

    The target is a genuine `LlavaForConditionalGeneration` from `tests/tiny_vlms.py`; the draft is a
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
    target_dir = build_tiny_vlm("llava", root / "target")
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
    export_bundle(target_dir, root / "draft", bundle, ExportOptions(kv_capacity=KV_CAPACITY, max_tree=MAX_TREE),
                  log=lambda *_: None)
    return bundle


def cached_tiny_bundle(root: str | Path) -> Path:
    """`make_tiny_bundle` once per process under `root` (e.g. a tmp_path_factory directory)."""
    if "llava" not in _CACHE:
        _CACHE["llava"] = make_tiny_bundle(root)
    return _CACHE["llava"]
