"""Training a self-spec draft's imitation network (see `draft/selfspec.py`) with the drafts' trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from dream_export.draft.config import DraftConfig
from dream_export.draft.data import FeatureDataset
from dream_export.draft.selfspec import new_selfspec
from dream_export.draft.train import train_draft
from dream_export.modeling.attention import group_mask
from dream_export.modeling.decoder import TargetDecoder, causal_mask


def exit_states(ds, decoder: TargetDecoder, exit_layer: int, log=print, batch: int = 32) -> None:
    """Replace each sample's embeddings in feature dataset `ds` (in memory) by its layer-`exit_layer` states.

    The shared layers are frozen, so their output for a sample never changes: computed once here
    instead of at every training step (for K of 24 layers that is most of a step's work). Samples run
    in batches of similar length, right-padded (causal attention keeps the padding out of real rows).
    """
    rep = decoder.n_heads // decoder.n_kv
    order = sorted(range(len(ds)), key=lambda i: len(ds.samples[i]["embeds"]))
    with torch.no_grad():
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            lens = [len(ds.samples[i]["embeds"]) for i in idx]
            t = max(lens)
            x = torch.zeros(len(idx), t, ds.samples[idx[0]]["embeds"].shape[1])
            for j, i in enumerate(idx):
                x[j, : lens[j]] = ds.samples[i]["embeds"].float()
            rot = decoder.rotary(x, torch.arange(t)[None].expand(len(idx), -1))
            hidden = group_mask(causal_mask(t).expand(len(idx), -1, -1), rep)
            for layer in range(exit_layer):
                x, _, _ = decoder.layer(layer, x, rot, None, hidden)
            for j, i in enumerate(idx):
                ds.samples[i]["embeds"] = x[j, : lens[j]].clone()
    log(f"computed the layer-{exit_layer} states of {len(ds)} samples")


def train_selfspec(data_dir: str | Path, target, cfg: DraftConfig, tcfg, out_dir: str | Path | None = None,
                   log=print, progress: bool = True, **kwargs):
    """Train a self-spec draft's imitation network on a feature directory (see `train.train_draft`).

    Loss: smooth-L1 between its output and the target's final-norm features (imitation, weight
    `tcfg.w_feature`) + soft cross-entropy of the target LM head's readouts (`tcfg.w_logits`); the
    layer-K inputs are computed with the frozen target, so any feature cache of the target serves.
    """
    draft = new_selfspec(cfg, target.side.decoder)
    ds = FeatureDataset(data_dir)
    exit_states(ds, target.side.decoder, cfg.exit_layer, log)
    draft.exit_states_in = True
    try:
        _, record = train_draft(ds, target.model.lm_head.weight, cfg, tcfg, out_dir, log=log, progress=progress,
                                draft=draft, **kwargs)
    finally:
        draft.exit_states_in = False
    return draft.eval(), record
