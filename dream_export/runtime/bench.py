"""Speculative vs autoregressive decoding on the same backend, side by side in one run."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dream_export.core.ties import tie_explained
from dream_export.runtime.pipeline import Pipeline
from dream_export.runtime.tree import TreeSpec


def bench(pipe: Pipeline, rows: list[dict], max_new_tokens: int = 128, tree: TreeSpec | None = None,
          mode: str | None = None, vtc_keep: float | None = None, warmup: int = 1, progress: bool = True) -> dict:
    """Run every prompt with plain AR decoding and with speculation; aggregate as DREAM's evaluation does.

    Without `mode`/`tree` the pipeline's default drafting (a searched bundle's chosen shape) is benched."""
    from tqdm import tqdm

    from dream_export.runtime.preprocess import load_image

    mode, tree = pipe.engine.default_drafting(mode, tree)
    tree = tree or TreeSpec()  # "ar": no drafting shape
    images = [load_image(r["image"]).convert("RGB") for r in rows]  # unreadable files: UsageError
    for img, r in list(zip(images, rows, strict=True))[:warmup]:  # first calls allocate; keep them out
        pipe.generate(img, r["prompt"], max_new_tokens=8, mode="ar")
        pipe.generate(img, r["prompt"], max_new_tokens=8, mode=mode, tree=tree)
    per = []
    ar_kw = {"max_new_tokens": max_new_tokens, "mode": "ar"}
    sp_kw = {"max_new_tokens": max_new_tokens, "mode": mode, "tree": tree, "vtc_keep": vtc_keep}
    for i, (img, r) in enumerate(tqdm(list(zip(images, rows, strict=True)), desc="bench", disable=not progress,
                                       mininterval=5)):
        # Whichever decoder answers a prompt second finds its image, prompt length and prefill already seen
        # (warm caches, ONNX Runtime's memory plan for that shape): alternate who goes first.
        first, second = (ar_kw, sp_kw) if i % 2 == 0 else (sp_kw, ar_kw)
        a, b = pipe.generate(img, r["prompt"], **first), pipe.generate(img, r["prompt"], **second)
        ar, sp = (a, b) if i % 2 == 0 else (b, a)
        match = ar.tokens == sp.tokens
        per.append({"prompt": r["prompt"], "task": r.get("task"), "match": match,
                    "tie_explained": None if match else tie_explained(pipe, img, r["prompt"], ar.tokens, sp.tokens),
                    "tokens": len(sp.tokens), "ar_tokens": len(ar.tokens), "tau": sp.stats["tau"],
                    "accepted": sp.stats["rounds"], "ar_seconds": ar.stats["total_seconds"],
                    "spec_seconds": sp.stats["total_seconds"], "ar_decode_seconds": ar.stats["decode_seconds"],
                    "spec_decode_seconds": sp.stats["decode_seconds"], "host_seconds": sp.stats["host_seconds"],
                    "split": {**sp.stats["seconds"]}, "text": sp.text})
    ar_t = sum(p["ar_seconds"] for p in per)
    sp_t = sum(p["spec_seconds"] for p in per)
    ar_d = sum(p["ar_decode_seconds"] for p in per)
    sp_d = sum(p["spec_decode_seconds"] for p in per)
    accepted = [a for p in per for a in p["accepted"]]
    toks = sum(p["tokens"] for p in per)
    split = {k: sum(p["split"].get(k, 0.0) for p in per) for k in ("vision", "prefill", "draft", "verify", "host")}
    return {
        "speedup": ar_t / sp_t, "decode_speedup": ar_d / sp_d, "tau": float(np.mean(accepted)) if accepted else 0.0,
        "match_rate": float(np.mean([p["match"] for p in per])),
        "mismatches_explained_by_ties": all(p["tie_explained"] for p in per if not p["match"]),
        "host_fraction": sum(p["host_seconds"] for p in per) / sp_d,
        "spec_tokens_per_s": toks / sp_t, "ar_tokens_per_s": sum(p["ar_tokens"] for p in per) / ar_t,
        "backend": pipe.backend.name, "time_split_seconds": split,
        "accept_histogram": np.bincount(accepted, minlength=tree.depth + 2).tolist() if accepted else [],
        "settings": {"precision": pipe.precision, "threads": getattr(pipe.backend, "threads", None), "mode": mode, "tree": [tree.k, tree.depth, tree.total], "max_new_tokens": max_new_tokens,
                     "vtc_keep": vtc_keep, "prompts": len(per)},
        "per_prompt": per,
    }


# From chains (cheapest to verify: CPUs pay per verified token) to the paper's wide trees.
SWEEP_SHAPES = (TreeSpec(1, 5, 6), TreeSpec(1, 6, 7), TreeSpec(1, 8, 9), TreeSpec(1, 10, 11), TreeSpec(2, 8, 12),
                TreeSpec(2, 10, 16), TreeSpec(4, 6, 16), TreeSpec(4, 6, 32), TreeSpec(4, 8, 32))
# Thread counts too: small graphs on few cores can run faster on one thread than on two.
SWEEP_THREADS = ("1", "target=2,draft=1", "2")


def sweep(pipe: Pipeline, rows: list[dict], load: Callable[[str], Pipeline], max_new_tokens: int = 128,
          vtc_keep: float | None = None, log=print) -> dict:
    """Bench every tree shape of `SWEEP_SHAPES` on `pipe`, then the fastest shape under each thread setting
    of `SWEEP_THREADS` (`load(threads)` opens the bundle with that setting).

    Returns {"sweep": per shape, fastest first; "thread_sweep": per setting, most tokens/s first}.
    """
    results = []
    for sh in SWEEP_SHAPES:
        # k = 1 runs as a chain: one draft_chain call per round where the bundle's graph has that depth
        sh_mode = "chain" if sh.k == 1 else "tree"
        s = bench(pipe, rows, max_new_tokens, sh, sh_mode, vtc_keep, warmup=0)
        results.append({"tree": [sh.k, sh.depth, sh.total], "mode": sh_mode, "speedup": s["speedup"],
                        "tau": s["tau"], "match_rate": s["match_rate"]})
        log(f"{sh_mode} {sh.k},{sh.depth},{sh.total}: speedup {s['speedup']:.2f}x tau {s['tau']:.2f}")
    shapes = sorted(results, key=lambda r: -r["speedup"])
    best, best_mode = TreeSpec(*shapes[0]["tree"]), shapes[0]["mode"]
    thread_results = []
    for th in SWEEP_THREADS:
        s = bench(load(th), rows, max_new_tokens, best, best_mode, vtc_keep, warmup=1)
        thread_results.append({"threads": th, "tree": [best.k, best.depth, best.total], "speedup": s["speedup"],
                               "spec_tokens_per_s": s["spec_tokens_per_s"],
                               "ar_tokens_per_s": s["ar_tokens_per_s"], "host_fraction": s["host_fraction"]})
        log(f"threads {th} (tree {best.k},{best.depth},{best.total}): speedup {s['speedup']:.2f}x, "
            f"{s['spec_tokens_per_s']:.0f} vs {s['ar_tokens_per_s']:.0f} tok/s")
    return {"sweep": shapes, "thread_sweep": sorted(thread_results, key=lambda r: -r["spec_tokens_per_s"])}
