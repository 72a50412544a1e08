"""Upstream DREAM checkpoints load into the project's draft class (round trip on a synthetic checkpoint)."""

import json

import pytest
import torch

from dream_export.draft.config import DraftConfig
from dream_export.draft.model import Draft, init_weights
from dream_export.draft.upstream import convert_upstream
from dream_export.errors import IncompatibleArtifactError

LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=96, vocab_size=50, num_hidden_layers=1, rms_norm_eps=1e-6, hidden_act="silu")


def _to_upstream(key: str) -> str:
    # The research code's names, written out independently of the converter's rules.
    if key.startswith("blocks.0."):
        return "layers.0." + key[len("blocks.0."):]
    if key.startswith("blocks.1."):
        return "layers.2." + key[len("blocks.1."):]
    names = {"cross.attn_gate": "layers.1.cross_attn_attn_gate", "cross.mlp_gate": "layers.1.cross_attn_mlp_gate"}
    if key in names:
        return names[key]
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        if key.startswith(f"cross.{part}"):
            return "layers.1.cross_attn." + key[len("cross."):]
    if key.startswith("cross."):
        return "layers.1." + key[len("cross."):]
    return key


def _write_upstream(tmp_path, fmt="bin"):
    cfg = DraftConfig.from_target({**LLAMA, "head_dim": 16}, null_key=False)
    d = Draft(cfg)
    init_weights(d)
    with torch.no_grad():
        d.cross.attn_gate.fill_(0.7)
        d.cross.mlp_gate.fill_(-0.3)
    state = {_to_upstream(k): v for k, v in d.state_dict().items() if "null_" not in k}
    state["embed_tokens.weight"] = torch.randn(50, 64)  # the research code keeps the target's table too
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    if fmt == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "model.safetensors"))
    return d


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_upstream_checkpoint_round_trip(tmp_path, fmt):
    original = _write_upstream(tmp_path, fmt)
    assert any(k.startswith("layers.1.cross_attn.q_norm") for k in torch.load(tmp_path / "pytorch_model.bin")
               ) if fmt == "bin" else True
    converted = convert_upstream(tmp_path)
    assert converted.config.head_dim == 16 and not converted.config.null_key
    t = 6
    emb, feats = torch.randn(1, t, 64), torch.randn(1, t, 64)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))[None]
    cmask = (torch.arange(t)[None, :] < torch.arange(t)[:, None])[None]
    a = original(emb, torch.arange(t)[None], mask, None, *original.cross_kv(feats), cmask, feats)
    b = converted(emb, torch.arange(t)[None], mask, None, *converted.cross_kv(feats), cmask, feats)
    assert torch.equal(a["feature"], b["feature"])
    # without a null key the first query (no visible feature) still yields finite output
    assert torch.isfinite(b["feature"]).all()


def test_upstream_unexpected_key_is_named(tmp_path):
    _write_upstream(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin")
    state["layers.3.self_attn.q_proj.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(IncompatibleArtifactError, match="layers.3"):
        convert_upstream(tmp_path)


def test_upstream_missing_config_is_clear(tmp_path):
    with pytest.raises(IncompatibleArtifactError, match="config.json"):
        convert_upstream(tmp_path)
