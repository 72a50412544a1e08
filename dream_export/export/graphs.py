"""Torch modules whose forward signatures are exactly the exported graphs' I/O (see core/graph_spec.py)."""

from __future__ import annotations

import torch
from torch import nn

from dream_export.draft.model import Draft, rope_cos_sin, soft_cap
from dream_export.modeling.attention import group_mask
from dream_export.modeling.decoder import TargetDecoder
from dream_export.modeling.importance import column_mean, query_max


def _topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), -1)
    v, i = torch.topk(lp, k, -1)
    return i, v


def used_slots(self_mask, embeds, self_key, self_value, cross_mask, new_feats, cross_key, cross_value):
    """The draft caches cut to the slots their masks span (masks may be as narrow as the used rows)."""
    s, c = self_mask.shape[-1] - embeds.shape[1], cross_mask.shape[-1] - new_feats.shape[1]
    return self_key[:, :, :, :s], self_value[:, :, :, :s], cross_key[:, :, :c], cross_value[:, :, :c]


class TargetGraph(nn.Module):
    """Prefill and tree verification in one graph over a runtime-owned fixed-capacity KV cache."""

    def __init__(self, decoder: TargetDecoder, lm_head: nn.Module, topk: int, softcap: float | None = None,
                 importance: bool = False, tap_norm: bool = False):
        super().__init__()
        self.decoder, self.lm_head, self.topk, self.softcap, self.importance = decoder, lm_head, topk, softcap, importance
        # taps through the final norm: the features a supernet draft injects from an earlier layer
        self.tap_norm = tap_norm

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key, past_value, logit_rows):
        o = self.decoder(inputs_embeds, position_ids, attention_mask, past_key, past_value,
                         output_attentions=self.importance)
        rows = o["hidden"][0].index_select(0, logit_rows)
        logits = soft_cap(self.lm_head(rows), self.softcap)
        ids, lps = _topk_logprobs(logits, self.topk)
        outs = [o["hidden"], o["new_k"], o["new_v"], ids, lps, logits]
        if self.importance:
            # taken in the grouped layout: the same numbers without a reshape of dynamic size
            outs += [column_mean(o["attn_grouped"][0]), query_max(o["attn_grouped"][0])]
        if o["taps"]:
            taps = [self.decoder.lm.norm(t) for t in o["taps"]] if self.tap_norm else o["taps"]
            outs.append(torch.cat(taps, -1))
        return tuple(outs)


class DraftGraph(nn.Module):
    """One draft graph for the context pass and the k-wide tree steps (the LM head is the target's)."""

    def __init__(self, draft: Draft, lm_head: nn.Module, topk: int, softcap: float | None = None):
        super().__init__()
        self.draft, self.lm_head, self.topk, self.softcap = draft, lm_head, topk, softcap

    def forward(self, embeds, positions, self_mask, self_key, self_value, cross_key, cross_value, new_feats,
                cross_mask, prev_feat, prev_taps=None):
        self_key, self_value, cross_key, cross_value = used_slots(self_mask, embeds, self_key, self_value,
                                                                  cross_mask, new_feats, cross_key, cross_value)
        nk, nv = self.draft.cross_kv(new_feats)
        caches = [(self_key[i], self_value[i]) for i in range(len(self.draft.blocks))]
        # EAGLE-3: the taps are fused here, on the device (other drafts leave prev_taps unread: ONNX drops it)
        prev = self.draft.predecessor(prev_feat, prev_taps)
        o = self.draft(embeds, positions, self_mask, caches, (cross_key, nk), (cross_value, nv), cross_mask, prev)
        ids, lps = _topk_logprobs(soft_cap(self.lm_head(o["feature"][0]), self.softcap), self.topk)
        return (o["feature"], ids, lps, torch.stack([kv[0] for kv in o["self_kv"]]),
                torch.stack([kv[1] for kv in o["self_kv"]]), nk, nv)


class DraftChainGraph(nn.Module):
    """A chain round of the draft in one call: the context pass, then `steps` greedy steps, unrolled.

    The context pass is the draft graph's (pending tokens over the committed caches plus the target's
    new features); its rows are returned for the runtime to commit. Each chain step then sees what
    the last pending token saw, the context rows and the steps before it, exactly as in the per-step
    path; the parent's draft feature joins the cross-attention scratch first. Scratch rows never
    leave the graph, and each step's argmax reads its embedding from `embed_table`.
    """

    def __init__(self, draft: Draft, lm_head: nn.Module, steps: int, softcap: float | None = None):
        super().__init__()
        self.draft, self.lm_head, self.steps, self.softcap = draft, lm_head, steps, softcap

    def _argmax(self, feature: torch.Tensor) -> torch.Tensor:
        """The greedy token of a [1,1,H] feature as [1,1]: an ArgMax the next step's embedding Gather takes
        as is (no log-softmax, TopK or index reshuffling per step)."""
        return soft_cap(self.lm_head(feature), self.softcap).argmax(-1)

    def forward(self, embeds, positions, self_mask, self_key, self_value, cross_key, cross_value, new_feats,
                cross_mask, embed_table):
        d, nb, steps = self.draft, len(self.draft.blocks), self.steps
        self_key, self_value, cross_key, cross_value = used_slots(self_mask, embeds, self_key, self_value,
                                                                  cross_mask, new_feats, cross_key, cross_value)
        nk, nv = d.cross_kv(new_feats)
        cache = [(self_key[i], self_value[i]) for i in range(nb)]
        o = d(embeds, positions, self_mask, cache, (cross_key, nk), (cross_value, nv), cross_mask, None)
        ctx = o["self_kv"]
        # Every step's rotary table and masks at once (CPU graphs pay per node): step j reads position
        # last + 1 + j and sees what the last pending token saw, then the context rows, then j + 1 rows of
        # its own scratch: the first columns of the last step's mask.
        cos, sin = rope_cos_sin(positions[:, -1:] + torch.arange(1, steps + 1), d.config.head_dim,
                                d.config.rope_theta)
        later = torch.ones_like(self_mask[:, -1:, :1]).expand(-1, -1, steps)
        self_hidden = group_mask(torch.cat([self_mask[:, -1:], later], -1), d.config.num_heads // d.config.num_kv_heads)
        cross_hidden = d.cross.hidden_mask(torch.cat([cross_mask[:, -1:], later], -1))
        # in-graph rows after each cache: the context's (any length), then one per step
        rows, ck, cv = list(ctx), nk, nv
        feature = o["feature"][:, -1:]
        ids = [self._argmax(feature)]
        for j in range(steps):
            k, v = d.cross_kv(feature, single=True)
            ck, cv = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
            drop = steps - 1 - j  # mask columns of later steps
            s = d.step(nn.functional.embedding(ids[-1], embed_table), (cos[:, :, j:j + 1], sin[:, :, j:j + 1]),
                       self_hidden[..., :-drop] if drop else self_hidden,
                       [[cache[i], rows[i]] for i in range(nb)], (cross_key, ck), (cross_value, cv),
                       cross_hidden[..., :-drop] if drop else cross_hidden, single=True)
            rows = s["self_kv"]  # a list cache gets its merged rows back
            feature = s["feature"]
            ids.append(self._argmax(feature))
        return (torch.cat(ids, -1)[0], torch.stack([kv[0] for kv in ctx]), torch.stack([kv[1] for kv in ctx]), nk, nv)


class VisionGraph(nn.Module):
    """Views [views, 3, h, w] → projected image rows [views, rows, H] (tower + projector, as the family
    adapter's `view_features`); the runtime splices them into the prompt (`runtime.image_layout`).
    Qwen2.5-VL's also takes its patch grid's bookkeeping (`grid`: window_index, reverse_index,
    patch_positions, full_mask, window_mask, as `core.graph_spec.VISION` orders them)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        self.model = vlm.model  # registers the weights as this module's

    def forward(self, pixel_values, *grid):
        return self.vlm.view_features(pixel_values, *grid)
