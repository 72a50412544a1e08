"""Torch modules whose forward signatures are exactly the exported graphs' I/O (see names.py)."""

from __future__ import annotations

import torch
from torch import nn

from dream_export.draft.model import Draft, soft_cap
from dream_export.export.decoder import TargetDecoder


def _topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), -1)
    v, i = torch.topk(lp, k, -1)
    return i, v


class TargetGraph(nn.Module):
    """Prefill and tree verification in one graph over a runtime-owned fixed-capacity KV cache."""

    def __init__(self, decoder: TargetDecoder, lm_head: nn.Module, topk: int, softcap: float | None = None,
                 importance: bool = False):
        super().__init__()
        self.decoder, self.lm_head, self.topk, self.softcap, self.importance = decoder, lm_head, topk, softcap, importance

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key, past_value, logit_rows):
        o = self.decoder(inputs_embeds, position_ids, attention_mask, past_key, past_value,
                         output_attentions=self.importance)
        rows = o["hidden"][0].index_select(0, logit_rows)
        logits = soft_cap(self.lm_head(rows), self.softcap)
        ids, lps = _topk_logprobs(logits, self.topk)
        outs = [o["hidden"], o["new_k"], o["new_v"], ids, lps, logits]
        if self.importance:
            # attention each slot receives in the last layer (mean over heads and queries, taken in the
            # grouped layout: the same numbers without a reshape of dynamic size)
            outs.append(o["attn_grouped"][0].mean((0, 1)))
        if o["taps"]:
            outs.append(torch.cat(o["taps"], -1))
        return tuple(outs)


class DraftGraph(nn.Module):
    """One draft graph for the context pass and the k-wide tree steps (the LM head is the target's)."""

    def __init__(self, draft: Draft, lm_head: nn.Module, topk: int, softcap: float | None = None):
        super().__init__()
        self.draft, self.lm_head, self.topk, self.softcap = draft, lm_head, topk, softcap

    def forward(self, embeds, positions, self_mask, self_key, self_value, cross_key, cross_value, new_feats,
                cross_mask, prev_feat):
        nk, nv = self.draft.cross_kv(new_feats)
        caches = [(self_key[i], self_value[i]) for i in range(len(self.draft.blocks))]
        o = self.draft(embeds, positions, self_mask, caches, (cross_key, nk), (cross_value, nv), cross_mask, prev_feat)
        ids, lps = _topk_logprobs(soft_cap(self.lm_head(o["feature"][0]), self.softcap), self.topk)
        return (o["feature"], ids, lps, torch.stack([kv[0] for kv in o["self_kv"]]),
                torch.stack([kv[1] for kv in o["self_kv"]]), nk, nv)


class DraftChainGraph(nn.Module):
    """`steps` greedy chain steps of the draft, unrolled: one call instead of one per drafted token.

    Step j sees the committed rows (masks), the scratch rows of steps before it and its own; the
    parent's draft feature joins the cross-attention scratch first, exactly as in the per-step path.
    """

    def __init__(self, draft: Draft, lm_head: nn.Module, steps: int, softcap: float | None = None):
        super().__init__()
        self.draft, self.lm_head, self.steps, self.softcap = draft, lm_head, steps, softcap

    def forward(self, embeds, positions, self_mask, self_key, self_value, cross_key, cross_value, feature,
                cross_mask, embed_table):
        nb = len(self.draft.blocks)
        scratch: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(nb)]
        ck, cv, ids = [], [], []
        x = embeds
        for j in range(self.steps):
            nk, nv = self.draft.cross_kv(feature)
            ck.append(nk)
            cv.append(nv)
            seen = torch.ones_like(self_mask[..., :1]).expand(-1, -1, j + 1)
            caches = [[(self_key[i], self_value[i]), *([(torch.cat([k for k, _ in scratch[i]], 2),
                                                         torch.cat([v for _, v in scratch[i]], 2))] if j else [])]
                      for i in range(nb)]
            o = self.draft(x, positions + j, torch.cat([self_mask, seen], -1), caches,
                           (cross_key, torch.cat(ck, 2)), (cross_value, torch.cat(cv, 2)),
                           torch.cat([cross_mask, seen], -1), None)
            for i, kv in enumerate(o["self_kv"]):
                scratch[i].append(kv)
            feature = o["feature"]
            tok, _ = _topk_logprobs(soft_cap(self.lm_head(feature[0]), self.softcap), 1)  # [1, 1]
            ids.append(tok[0])
            x = embed_table.index_select(0, tok[0])[None]
        return torch.cat(ids)


class VisionGraph(nn.Module):
    """Pixels → projected image embeddings ready to splice into the prompt (tower + projector)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        feats = self.model.model.get_image_features(pixel_values=pixel_values)
        if not torch.is_tensor(feats):  # transformers 5 wraps it in a model output
            feats = getattr(feats, "pooler_output", None) if getattr(feats, "pooler_output", None) is not None \
                else feats[0]
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])
