"""The draft is built from the target's config for every family, and its masks mean what they say."""

import pytest
import torch

from dream_export.draft.config import DraftConfig
from dream_export.draft.model import Draft, init_weights

CONFIGS = {
    "llama-gqa": dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=50, num_hidden_layers=6, rms_norm_eps=1e-5),
    "gemma3-headdim": dict(model_type="gemma3_text", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=32, intermediate_size=96, vocab_size=50, num_hidden_layers=6,
                           hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0),
    "mistral-headdim": dict(model_type="mistral", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                            head_dim=24, intermediate_size=96, vocab_size=50, num_hidden_layers=6),
}


def _inputs(cfg, t=5, c=5):
    torch.manual_seed(0)
    emb = torch.randn(1, t, cfg.hidden_size)
    pos = torch.arange(t)[None]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))[None]
    feats = torch.randn(1, c, cfg.hidden_size)
    cross_mask = (torch.arange(c)[None, :] < torch.arange(t)[:, None])[None]
    return emb, pos, mask, feats, cross_mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arch", ["dream", "eagle2", "eagle3"])
def test_draft_fits_family_shapes(name, arch):
    cfg = DraftConfig.from_target(CONFIGS[name], arch=arch)
    assert cfg.head_dim == CONFIGS[name].get("head_dim", 64 // CONFIGS[name]["num_attention_heads"])
    assert cfg.norm_flavour == ("gemma_rms" if name.startswith("gemma") else "rms")
    d = Draft(cfg)
    init_weights(d)
    emb, pos, mask, feats, cmask = _inputs(cfg)
    if arch == "eagle3":
        feats = d.target_feature(None, [feats] * len(cfg.fuse_layers))
    k, v = d.cross_kv(feats)
    out = d(emb, pos, mask, None, k, v, cmask, feats)
    assert out["feature"].shape == emb.shape and torch.isfinite(out["feature"]).all()
    assert [kv[0].shape for kv in out["self_kv"]] == [(1, cfg.num_kv_heads, 5, cfg.head_dim)] * len(d.blocks)


def test_cross_block_is_identity_at_init_and_first_query_is_finite():
    cfg = DraftConfig.from_target(CONFIGS["llama-gqa"])
    d = Draft(cfg)
    init_weights(d)
    emb, pos, mask, feats, cmask = _inputs(cfg)
    x = torch.randn(1, 5, cfg.hidden_size)
    k, v = d.cross_kv(feats)
    # tanh gates start at 0: the block passes its input through unchanged
    assert torch.equal(d.cross(x, k, v, d.cross.hidden_mask(cmask)), x)
    with torch.no_grad():
        d.cross.attn_gate.fill_(1.0)
        d.cross.mlp_gate.fill_(1.0)
    # query 0 sees no target feature; the null key keeps its softmax defined
    y = d.cross(x, k, v, d.cross.hidden_mask(cmask))
    assert torch.isfinite(y).all()
    # and query 0's output does not depend on any (masked) feature
    feats2 = feats + torch.randn_like(feats)
    k2, v2 = d.cross_kv(feats2)
    y2 = d.cross(x, k2, v2, d.cross.hidden_mask(cmask))
    assert torch.allclose(y[0, 0], y2[0, 0]) and not torch.allclose(y[0, 1:], y2[0, 1:])


def test_cross_attention_honours_tree_mask():
    """A node must not read a sibling branch's draft feature (an upstream DREAM defect)."""
    cfg = DraftConfig.from_target(CONFIGS["llama-gqa"])
    d = Draft(cfg)
    init_weights(d)
    with torch.no_grad():
        d.cross.attn_gate.fill_(1.0)
    emb, pos, mask, feats, _ = _inputs(cfg, t=2, c=3)
    # two sibling queries; feature 2 belongs to the branch of query 1 only
    cmask = torch.tensor([[[True, True, False], [True, True, True]]])
    mask = torch.eye(2, dtype=torch.bool)[None]
    out = d(emb, pos, mask, None, *d.cross_kv(feats), cmask, feats[:, :2])
    feats2 = feats.clone()
    feats2[0, 2] += 5.0
    out2 = d(emb, pos, mask, None, *d.cross_kv(feats2), cmask, feats2[:, :2])
    assert torch.allclose(out["feature"][0, 0], out2["feature"][0, 0])
    assert not torch.allclose(out["feature"][0, 1], out2["feature"][0, 1])


def test_ablation_without_cross_attention_has_two_blocks():
    cfg = DraftConfig.from_target(CONFIGS["llama-gqa"], cross_attention=False)
    d = Draft(cfg)
    assert d.cross is None and len(d.blocks) == 2


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown draft arch"):
        DraftConfig.from_target(CONFIGS["llama-gqa"], arch="medusa")


@pytest.mark.parametrize("name", CONFIGS)
def test_one_row_steps_match_the_general_path(name):
    """A chain graph's one-row steps (head splits as reshapes) compute what the general path does."""
    from dream_export.draft.model import rope_cos_sin
    from dream_export.modeling.attention import group_mask

    cfg = DraftConfig.from_target(CONFIGS[name])
    d = Draft(cfg)
    init_weights(d)
    with torch.no_grad():
        d.cross.attn_gate.fill_(1.0)
        d.cross.mlp_gate.fill_(1.0)
    emb, pos, mask, feats, cmask = _inputs(cfg, t=1, c=3)
    cmask = torch.ones(1, 1, 3, dtype=torch.bool)
    e4, p4, m4, f4, cm4 = _inputs(cfg, t=4, c=3)
    ctx = d(e4, p4, m4, None, *d.cross_kv(f4), cm4)  # cached rows for the step to attend to
    cache = [(k, v) for k, v in ctx["self_kv"]]
    rot = rope_cos_sin(pos + 4, cfg.head_dim, cfg.rope_theta)
    hidden = group_mask(torch.ones(1, 1, 5, dtype=torch.bool), cfg.num_heads // cfg.num_kv_heads)
    k, v = d.cross_kv(feats)
    assert all(torch.equal(a, b) for a, b in zip(d.cross_kv(feats[:, :1], single=True), d.cross_kv(feats[:, :1]),
                                                 strict=True))
    outs = [d.step(emb, rot, hidden, cache, k, v, d.cross.hidden_mask(cmask), single=s) for s in (False, True)]
    torch.testing.assert_close(outs[0]["feature"], outs[1]["feature"], rtol=0, atol=0)
    for (k0, v0), (k1, v1) in zip(outs[0]["self_kv"], outs[1]["self_kv"], strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
