"""Acceptance length τ of drafts with the torch reference decoder, per task, plus exactness vs greedy."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from dream_export.core.prompts import read_prompts
from dream_export.draft.reference import generate
from dream_export.runtime.tree import TreeSpec
from dream_export.runtime.vtc import vtc_keep_indices, vtc_score_output


def evaluate_drafts(target, drafts: dict, data_path, spec: TreeSpec, max_new_tokens: int = 128,
                    modes=("tree",), vtc_keep: float | None = None, limit: int | None = None,
                    progress: bool = True, vtc_score: str = "mean") -> dict:
    """For each named draft and mode: τ overall and per task, and whether greedy output equals AR.

    `drafts`: name -> Draft. Rows of the JSONL may carry a "task" key for the per-task split. With
    `vtc_keep`, image tokens are ranked by `vtc_score` (runtime.vtc.VTC_SCORES: "mean" or "max").
    """
    import torch
    from PIL import Image
    from tqdm import tqdm

    from dream_export.modeling.importance import column_mean, query_max

    vtc_score_output(vtc_score)  # a clear error for an unknown score
    score_fn = {"mean": column_mean, "max": query_max}[vtc_score]

    rows = read_prompts(data_path)[:limit]
    res: dict = {name: {m: {"accepted": [], "by_task": defaultdict(list), "match": 0} for m in modes}
                 for name in drafts}
    n = 0
    for row in tqdm(rows, desc="evaluate drafts", disable=not progress, mininterval=5):
        emb, image_mask = target.prompt_embeds(Image.open(row["image"]).convert("RGB"), row["prompt"])
        ar = generate(target.side, emb, max_new_tokens, mode="ar", eos_id=target.eos_id)
        keep = None
        if vtc_keep is not None:
            t = emb.shape[1]
            with torch.no_grad():
                pk, pv = target.side.decoder.empty_cache()
                from dream_export.modeling.decoder import causal_mask

                o = target.side.decoder(emb, torch.arange(t)[None], causal_mask(t), pk, pv, output_attentions=True)
            importance = score_fn(o["attn"][-1][0]).numpy()
            keep = vtc_keep_indices(image_mask, importance, vtc_keep)
        n += 1
        for name, draft in drafts.items():
            for mode in modes:
                g = generate(target.side, emb, max_new_tokens, draft=draft, mode=mode, spec=spec,
                             eos_id=target.eos_id, draft_keep=keep, eagle3_taps=draft.config.arch == "eagle3")
                r = res[name][mode]
                r["accepted"] += g.accepted
                r["by_task"][row.get("task", "all")] += g.accepted
                r["match"] += g.tokens == ar.tokens
    out = {}
    for name, per_mode in res.items():
        out[name] = {}
        for mode, r in per_mode.items():
            out[name][mode] = {"tau": float(np.mean(r["accepted"])), "match_rate": r["match"] / max(n, 1),
                               "tau_by_task": {t: float(np.mean(v)) for t, v in sorted(r["by_task"].items())},
                               "rounds": len(r["accepted"])}
    return {"prompts": n, "tree": [spec.k, spec.depth, spec.total], "results": out}
