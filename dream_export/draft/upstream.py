"""Import drafts saved by the public DREAM research code into this project's draft class.

The research code's draft (`Model` in its `cnets.py`) stores three layers and a final norm:

    layers.0.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, post_attention_layernorm}   (no input norm)
    layers.1.{cross_attn.{q,k,v,o}_proj, cross_attn.{q,k}_norm, input_layernorm,
              cross_attn_attn_gate, mlp.*, post_attention_layernorm, cross_attn_mlp_gate}
    layers.2.{input_layernorm, self_attn.*, mlp.*, post_attention_layernorm}
    norm.weight

mapped here to `blocks.0`, `cross` and `blocks.1`, with the gates renamed `attn_gate` / `mlp_gate`.
Its `config.json` is a Llama config at the target's width; head_dim there is hidden/heads. It was
trained without a null key, so the converted config sets `null_key=False`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dream_export.draft.config import DraftConfig
from dream_export.errors import IncompatibleArtifactError

_RULES = [
    (r"^layers\.0\.(.*)$", r"blocks.0.\1"),
    (r"^layers\.2\.(.*)$", r"blocks.1.\1"),
    (r"^layers\.1\.cross_attn_attn_gate$", "cross.attn_gate"),
    (r"^layers\.1\.cross_attn_mlp_gate$", "cross.mlp_gate"),
    (r"^layers\.1\.cross_attn\.(.*)$", r"cross.\1"),
    (r"^layers\.1\.(.*)$", r"cross.\1"),
    (r"^norm\.weight$", "norm.weight"),
]
# Buffers and heads the research code keeps beside the draft but this project takes from the target.
_IGNORED = re.compile(r"^(embed_tokens|lm_head|head|fc)\.|rotary_emb|inv_freq")


def map_key(key: str) -> str | None:
    """Project key for an upstream key, or None for keys that belong to the target (ignored)."""
    key = key.removeprefix("ea_layer.").removeprefix("module.")
    if _IGNORED.search(key):
        return None
    for pat, rep in _RULES:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    raise IncompatibleArtifactError(f"unexpected key {key!r} in upstream DREAM checkpoint")


def _load_state(path: Path) -> dict:
    import torch

    st = path / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = path / "pytorch_model.bin"
    if pt.exists():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise IncompatibleArtifactError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def convert_upstream(path: str | Path):
    """Load an upstream DREAM draft directory as a `Draft` (strict: every weight must map and fit)."""
    from dream_export.draft.model import Draft

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise IncompatibleArtifactError(f"{path} has no config.json (expected the research code's Llama config)")
    raw = json.loads(cfg_path.read_text())
    heads = raw["num_attention_heads"]
    cfg = DraftConfig.from_target({**raw, "head_dim": raw["hidden_size"] // heads}, arch="dream", null_key=False)
    draft = Draft(cfg)
    state = {}
    for k, v in _load_state(path).items():
        new = map_key(k)
        if new is not None:
            state[new] = v.float()
    own = draft.state_dict()
    for name in ("cross.null_k", "cross.null_v"):
        state.setdefault(name, own[name])
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or extra or bad:
        raise IncompatibleArtifactError(f"upstream checkpoint does not fit: missing {missing[:4]}, "
                                        f"unexpected {extra[:4]}, wrong shape {bad[:4]}")
    draft.load_state_dict(state)
    return draft.eval()
