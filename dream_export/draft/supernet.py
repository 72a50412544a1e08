"""DREAM-S supernet: one set of draft weights, many sub-networks (elastic heads, visual keep, injected layer).

A sub-network (`SubNet`) is chosen by three knobs:

- `heads`: query heads kept in the draft's last self-attention block, the best `heads` by Taylor
  importance (|weight · gradient| of the distillation loss over each head's Q rows and O columns);
  training masks the others' outputs, `prune` removes them from the weights (the KV heads stay, so the
  caches keep their layout);
- `vtc_keep`: the share of image tokens kept in the draft's input stream (runtime.vtc);
- `layer`: the target layer whose hidden state the cross-attention reads, one of the last five,
  numbered as hidden_states (the last one is the final-norm state every DREAM draft reads; earlier
  ones pass through the same final norm, so every choice feeds features of one scale).

A configuration may also fix the drafting shape (`tree`: a chain or an EAGLE-2 tree, "K,DEPTH,TOTAL"):
no weights change, the runtime drafts that shape by default (`dream-export search` chooses it per target).

Training has two phases (DREAM-S's progressive training): the full network (or an existing full
draft as the start), then one random sub-network per step. `supernet.json` beside the weights records
the head ranking and the choices, so that export and the search know them.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dream_export.draft.model import Draft
from dream_export.errors import IncompatibleArtifactError, UsageError
from dream_export.runtime.subnet import SubNet
from dream_export.runtime.tree import TreeSpec

SPEC_FILE = "supernet.json"
HEAD_RATIOS = (0.25, 0.5, 0.75, 1.0)
VTC_KEEPS = (0.5, 0.75, 1.0)
LAST_LAYERS = 5


@dataclass
class SupernetSpec:
    """What a supernet offers: its head ranking and the choices each knob takes."""

    num_heads: int
    num_kv_heads: int
    head_order: list[int]  # query heads of the last block, most important first
    head_importance: list[float]
    head_choices: list[int]
    vtc_keeps: list[float]
    layers: list[int]  # hidden_states indices, ascending; the last is the final-norm state
    training: dict = field(default_factory=dict)

    @property
    def final_layer(self) -> int:
        return self.layers[-1]

    @property
    def taps(self) -> list[int]:
        """The layers a target must expose besides its final state."""
        return self.layers[:-1]

    def full(self) -> SubNet:
        return SubNet(self.num_heads, 1.0, self.final_layer)

    def candidates(self) -> list[SubNet]:
        """Every configuration, in a fixed order."""
        return [SubNet(h, k, lay) for h in self.head_choices for k in self.vtc_keeps for lay in self.layers]

    def check(self, sub: SubNet) -> None:
        if not 1 <= sub.heads <= self.num_heads:
            raise UsageError(f"heads {sub.heads}: the last block has {self.num_heads} query heads")
        if not 0.0 < sub.vtc_keep <= 1.0:
            raise UsageError(f"vtc_keep {sub.vtc_keep} must be in (0, 1]")
        if sub.layer not in self.layers:
            raise UsageError(f"layer {sub.layer} is not injectable; choose one of {self.layers}")
        if sub.tree is not None:
            try:
                TreeSpec.parse(sub.tree)
            except ValueError as e:
                raise UsageError(f"tree {sub.tree!r}: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> SupernetSpec | None:
        """The spec of draft directory `path`, or None for a plain draft."""
        p = Path(path, SPEC_FILE)
        return cls(**json.loads(p.read_text())) if p.exists() else None


_KNOB = re.compile(r"\s*(\w+)\s*=\s*([^=]*?)\s*(?:,(?=\s*\w+\s*=)|$)")


def parse_subnet(text: str, spec: SupernetSpec) -> SubNet:
    """From "heads=2,vtc_keep=0.75,layer=22[,tree=1,5,6]" (`heads` may be a ratio such as 0.5; omitted
    knobs: full; `tree` K,DEPTH,TOTAL is the drafting shape the runtime then uses by default)."""
    vals = {"heads": str(spec.num_heads), "vtc_keep": "1", "layer": str(spec.final_layer), "tree": None}
    usage = f"sub-network {text!r}: expected heads=N (or a ratio such as 0.5),vtc_keep=R,layer=L[,tree=K,DEPTH,TOTAL]"
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _KNOB.match(text, pos)
        if m is None or m.end() == pos:
            raise UsageError(usage)
        key = {"keep": "vtc_keep", "vtc": "vtc_keep", "shape": "tree"}.get(m[1], m[1])
        if key not in vals or not m[2]:
            raise UsageError(usage)
        vals[key], pos = m[2], m.end()
    try:
        # a count ("2") or a keep ratio of the query heads ("0.5")
        heads = int(vals["heads"]) if vals["heads"].isdigit() else max(1, round(float(vals["heads"]) * spec.num_heads))
        sub = SubNet(heads, float(vals["vtc_keep"]), int(vals["layer"]),
                     None if vals["tree"] is None else ",".join(p.strip() for p in vals["tree"].split(",")))
    except ValueError as e:
        raise UsageError(f"sub-network {text!r}: every value must be a number") from e
    spec.check(sub)
    return sub


def head_choices(num_heads: int) -> list[int]:
    """Kept-head counts for the keep ratios 0.25/0.5/0.75/1 (distinct, at least one head)."""
    return sorted({max(1, int(round(r * num_heads))) for r in HEAD_RATIOS})


def last_layers(num_layers: int) -> list[int]:
    """The last five hidden_states indices of a `num_layers` decoder (the last is the final-norm state)."""
    return list(range(max(1, num_layers - LAST_LAYERS + 1), num_layers + 1))


# ------------------------------------------------------------------------------------ heads


def _last_attn(draft: Draft):
    return draft.blocks[-1].self_attn


@contextmanager
def head_mask(draft: Draft, kept: list[int]):
    """Within the block, the last block's query heads outside `kept` contribute nothing (their slice of
    the O projection's input is zeroed): the masked supernet computes what `prune` exports."""
    cfg = draft.config
    m = torch.zeros(cfg.num_heads, cfg.head_dim)
    m[list(kept)] = 1.0
    m = m.reshape(-1)
    handle = _last_attn(draft).o_proj.register_forward_pre_hook(lambda _mod, args: (args[0] * m.to(args[0].dtype),))
    try:
        yield
    finally:
        handle.remove()


def kept_heads(spec: SupernetSpec, heads: int) -> list[int]:
    """The `heads` most important query heads."""
    return list(spec.head_order[:heads])


def taylor_importance(draft: Draft, batches, loss_fn: Callable[[Draft, dict], torch.Tensor]) -> list[float]:
    """Per query head of the last block: Σ |w · ∂loss/∂w| over its Q-projection rows and O-projection
    columns, accumulated over `batches` (first-order estimate of the loss change when it is removed)."""
    attn, d = _last_attn(draft), draft.config.head_dim
    score = torch.zeros(draft.config.num_heads)
    draft.train()
    for batch in batches:
        draft.zero_grad(set_to_none=True)
        loss_fn(draft, batch).backward()
        q = (attn.q_proj.weight * attn.q_proj.weight.grad).abs().reshape(-1, d, attn.q_proj.in_features)
        o = (attn.o_proj.weight * attn.o_proj.weight.grad).abs().reshape(attn.o_proj.out_features, -1, d)
        score += q.sum((1, 2)).detach() + o.sum((0, 2)).detach()
    draft.zero_grad(set_to_none=True)
    return score.tolist()


def prune(draft: Draft, spec: SupernetSpec, heads: int) -> Draft:
    """A new draft with only the `heads` best query heads in its last block (weights copied; the other
    heads removed). Kept heads are ordered by their KV head, which `HeadMappedSelfAttention` requires."""
    cfg = draft.config
    if heads == cfg.num_heads:
        out = Draft(cfg)
        out.load_state_dict(draft.state_dict())
        return out.eval()
    rep, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    kept = sorted(kept_heads(spec, heads), key=lambda h: (h // rep, h))
    out = Draft(replace(cfg, last_block_heads=[h // rep for h in kept]))
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
    state = dict(draft.state_dict())
    prefix = f"blocks.{len(draft.blocks) - 1}.self_attn."
    state[prefix + "q_proj.weight"] = state[prefix + "q_proj.weight"][idx]
    state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, idx]
    out.load_state_dict(state)
    return out.eval()


# ------------------------------------------------------------------------------------ features


def layer_features(batch: dict, layer: int, spec: SupernetSpec, final_norm: Callable, noise: float) -> torch.Tensor:
    """The cross-attention's features [B,T,H] for injected `layer`: the target's final-norm state, or an
    earlier layer's (from the batch's taps) through the same final norm; EAGLE-style noise per sample."""
    from dream_export.draft.train import feature_noise

    if layer == spec.final_layer:
        feats = batch["clean_feats"]
    else:
        h = batch["clean_feats"].shape[-1]
        i = spec.taps.index(layer)
        with torch.no_grad():
            feats = final_norm(batch["taps"][..., i * h:(i + 1) * h]).float()
    if not noise:
        return feats
    out = feats.clone()
    for b, n in enumerate(batch["k_valid"].sum(1).tolist()):
        out[b, :n] += feature_noise(feats[b, :n], noise)
    return out


# ------------------------------------------------------------------------------------ training


@dataclass
class SupernetTrainConfig:
    """Phase lengths and the sub-network sampling of DREAM-S's two-phase training."""

    phase1_steps: int = 0  # full-network steps (0 with an initial full draft)
    phase2_steps: int = 1000  # one random sub-network per step
    importance_batches: int = 8
    seed: int = 0


def train_supernet(data_dir: str | Path, lm_head_weight: torch.Tensor, final_norm: Callable, num_layers: int,
                   cfg, tcfg, scfg: SupernetTrainConfig, init: str | Path | None = None,
                   out_dir: str | Path | None = None, log=print, progress: bool = True) -> tuple[Draft, SupernetSpec]:
    """Train a DREAM draft as a supernet on a feature directory whose taps are the target's last layers.

    Phase 1 trains the full network (`train_draft`'s recipe) unless `init` names a full draft to start
    from; the head ranking is then measured once (Taylor importance on `importance_batches` batches);
    phase 2 trains one random sub-network per step (heads, visual keep ratio, injected layer) with the
    same losses. The draft and `supernet.json` are saved (atomically) to `out_dir` when given.
    """
    from dream_export.draft.data import FeatureDataset
    from dream_export.draft.model import soft_cap
    from dream_export.draft.train import (
        collate,
        distill_loss,
        load_draft,
        save_draft,
        train_draft,
    )
    from dream_export.io import warmup_cosine

    torch.set_num_threads(tcfg.threads)
    torch.manual_seed(scfg.seed)
    rng = random.Random(scfg.seed)
    ds = FeatureDataset(data_dir)
    layers = last_layers(num_layers)
    have = list(ds.meta["config"].get("taps") or [])
    if have != layers[:-1]:
        raise IncompatibleArtifactError(
            f"{data_dir} has taps {have}; a supernet needs the last layers {layers[:-1]} (generate features with "
            "those taps, e.g. `train-draft --supernet` with a new --features directory)")
    t0 = time.time()
    if init is not None:
        draft = load_draft(init)
        if draft.config.arch != "dream" or draft.config.last_block_heads is not None:
            raise UsageError(f"{init}: a supernet starts from a full DREAM draft")
        draft.train()
    else:
        draft, _ = train_draft(data_dir, lm_head_weight, cfg, replace(tcfg, steps=scfg.phase1_steps), log=log,
                               progress=progress)
    c = draft.config
    head = lm_head_weight.detach().float()
    logits_of = lambda x: soft_cap(x @ head.T, c.final_logit_softcapping)  # noqa: E731
    n_train = max(1, len(ds) - 64)
    spec = SupernetSpec(c.num_heads, c.num_kv_heads, list(range(c.num_heads)), [0.0] * c.num_heads,
                        head_choices(c.num_heads), list(VTC_KEEPS), layers)

    def batch_of(sub: SubNet, noise: float) -> dict:
        samples = [ds[rng.randrange(n_train)] for _ in range(tcfg.batch_size)]
        b = collate(samples, draft, None if sub.vtc_keep >= 1.0 else sub.vtc_keep, 0.0, True)
        b["clean_feats"] = b["feats"]
        b["layer_feats"] = layer_features(b, sub.layer, spec, final_norm, noise)
        return b

    full = spec.full()
    imp_batches = [batch_of(full, 0.0) for _ in range(scfg.importance_batches)]
    importance = taylor_importance(draft, imp_batches,
                                   lambda d, b: distill_loss(d, b, b["layer_feats"], logits_of, tcfg)[0])
    spec.head_importance = [round(x, 6) for x in importance]
    spec.head_order = sorted(range(c.num_heads), key=lambda h: -importance[h])
    log(f"head importance (Taylor): {spec.head_importance}; order {spec.head_order}")
    from tqdm import tqdm

    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=0.0)
    history = []
    candidates = spec.candidates()
    for step in tqdm(range(scfg.phase2_steps), desc="supernet phase 2", disable=not progress, mininterval=5):
        sub = rng.choice(candidates)
        batch = batch_of(sub, tcfg.noise)
        draft.train()
        with head_mask(draft, kept_heads(spec, sub.heads)):
            loss, loss_p = distill_loss(draft, batch, batch["layer_feats"], logits_of, tcfg)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, tcfg.lr, tcfg.warmup, scfg.phase2_steps, tcfg.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == scfg.phase2_steps:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "p": round(loss_p.item(), 4),
                            "sub": sub.label(), "minutes": round((time.time() - t0) / 60, 2)})
            log(json.dumps(history[-1]))
    draft.eval()
    spec.training = {"init": str(init) if init else None, "phase1_steps": 0 if init else scfg.phase1_steps,
                     "phase2_steps": scfg.phase2_steps, "batch_size": tcfg.batch_size, "lr": tcfg.lr,
                     "samples": len(ds), "minutes": round((time.time() - t0) / 60, 2), "history": history}
    if out_dir is not None:
        record = {"draft_config": asdict(c), "train_config": asdict(tcfg), "data": ds.meta,
                  "supernet": asdict(spec), "train_minutes": spec.training["minutes"], "samples": len(ds)}
        save_draft(draft, out_dir, record, extra_files={SPEC_FILE: json.dumps(asdict(spec), indent=2)})
    return draft, spec
