"""What a precision costs: τ, greedy agreement with fp32, demo answer accuracy and model size per bundle.

Every bundle answers the same held-out prompts greedily with speculative decoding through the normal
runtime. Against the first (fp32) bundle: `match_rate` = share of prompts whose output tokens are
identical, `first_divergence` = token index where each differing output departs. `accuracy` = share of
the counting and colour questions (rows with a `task` and a `reference`) whose scored part, as the
caller's `answer_key(task, text)` extracts it, equals the reference's (the CLI passes the demo's own
scoring); without an `answer_key` no accuracy is reported. τ aggregates as `dream-export bench` does:
mean tokens gained per target pass over all rounds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dream_export.core.ties import first_divergence
from dream_export.errors import UsageError
from dream_export.io import atomic_write_text
from dream_export.options import DEFAULT_TREE, tree_text
from dream_export.runtime.tree import TreeSpec

ACCURACY_TASKS = ("count", "color")
# The scored part of an answer to a question of a task: answer_key(task, text) -> str.
AnswerKey = Callable[[str, str], str]


def precision_name(manifest: dict) -> str:
    """fp32, fp16, int8-all, or e.g. int8-target when only some components are converted."""
    prec = manifest.get("precision", {})
    comps = [g for g in ("vision", "target", "draft") if prec.get(g, "fp32") != "fp32"]
    if not comps:
        return "fp32"
    kinds = sorted({prec[g] for g in comps})
    if len(comps) == 3 and len(kinds) == 1:
        return kinds[0] if kinds[0] != "int8" else "int8-all"
    return "-".join(kinds) + "-" + "+".join(comps)


def run_prompts(bundle_dir: str | Path, rows: list[dict], tree: TreeSpec = DEFAULT_TREE, max_new_tokens: int = 128,
                threads: int = 1, progress: bool = True, desc: str = "") -> dict:
    """Greedy speculative answers of one bundle: tokens, text and accepted lengths per prompt."""
    import time

    from tqdm import tqdm

    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.preprocess import load_image

    pipe = Pipeline.load(bundle_dir, threads=threads)
    per, seconds, tokens = [], 0.0, 0
    for r in tqdm(rows, desc=desc or Path(bundle_dir).name, disable=not progress, mininterval=5):
        t0 = time.perf_counter()
        res = pipe.generate(load_image(r["image"]).convert("RGB"), r["prompt"], max_new_tokens=max_new_tokens,
                            mode="tree", tree=tree)
        seconds += time.perf_counter() - t0
        tokens += len(res.tokens)
        per.append({"tokens": res.tokens, "text": res.text, "rounds": res.stats["rounds"]})
    return {"per_prompt": per, "tokens_per_s": tokens / max(seconds, 1e-9), "manifest": pipe.bundle.manifest}


def summarize(run: dict, ref: dict, rows: list[dict], bundle_dir: str | Path, answer_key: AnswerKey | None = None) -> dict:
    """Metrics of one bundle's run against the fp32 reference run."""
    from dream_export.calib.writer import model_bytes
    from dream_export.runtime.bundle import Bundle

    per, base = run["per_prompt"], ref["per_prompt"]
    rounds = [a for p in per for a in p["rounds"]]
    same = [p["tokens"] == q["tokens"] for p, q in zip(per, base, strict=True)]
    firsts = [first_divergence(p["tokens"], q["tokens"]) for p, q, s in zip(per, base, same, strict=True) if not s]
    key = answer_key
    scored = [(p, r) for p, r in zip(per, rows, strict=True)
              if key and r.get("task") in ACCURACY_TASKS and "reference" in r]
    hits = [key(r["task"], p["text"]) == key(r["task"], r["reference"]) for p, r in scored]
    by_task = {t: float(np.mean([h for h, (_, r) in zip(hits, scored, strict=True) if r["task"] == t]))
               for t in ACCURACY_TASKS if any(r["task"] == t for _, r in scored)}
    sizes = model_bytes(Bundle.open(bundle_dir))
    return {"bundle": str(Path(bundle_dir).resolve()), "components": run["manifest"].get("precision", {}),
            "tau": float(np.mean(rounds)) if rounds else 0.0, "match_rate": float(np.mean(same)),
            "matches": int(sum(same)), "prompts": len(per), "first_divergence": firsts,
            "first_divergence_median": float(np.median(firsts)) if firsts else None,
            "accuracy": float(np.mean(hits)) if hits else None, "accuracy_by_task": by_task,
            "accuracy_questions": len(hits), "size_bytes": sizes["total"], "size_bytes_by_component": sizes,
            "tokens_per_s_cpu": run["tokens_per_s"],
            "calibration": {k: v for k, v in run["manifest"].get("calibration", {}).items()
                            if k in ("method", "exclude", "smoothquant", "samples", "seed")}}


def calib_report(bundles: list[tuple[str | None, Path]], data: str | Path, out: str | Path | None = None,
                 tree: TreeSpec = DEFAULT_TREE, max_new_tokens: int = 128, limit: int | None = None, threads: int = 1,
                 log=print, progress: bool = True, answer_key: AnswerKey | None = None) -> dict:
    """Evaluate `bundles` ((name or None, path); the first must be fp32) on `data`; write `out` as JSON.

    `answer_key(task, text)`: the scored part of an answer, for the accuracy columns (None: no accuracy)."""
    from dream_export.core.prompts import read_prompts
    from dream_export.runtime.bundle import Bundle

    if not bundles:
        raise UsageError("calib-report needs at least the fp32 bundle")
    opened = [(name or precision_name(Bundle.open(p).manifest), Path(p)) for name, p in bundles]
    if precision_name(Bundle.open(opened[0][1]).manifest) != "fp32":
        raise UsageError(f"the first bundle is the reference and must be fp32 ({opened[0][1]} is not)")
    names = [n for n, _ in opened]
    if len(set(names)) != len(names):
        raise UsageError(f"two bundles share a precision name {names}; name them NAME=PATH")
    rows = read_prompts(data)[:limit]
    runs = {}
    for name, path in opened:
        runs[name] = run_prompts(path, rows, tree, max_new_tokens, threads, progress, desc=name)
    ref = runs[names[0]]
    report = {"data": str(Path(data).resolve()), "prompts": len(rows), "tree": tree_text(tree), "max_new_tokens": max_new_tokens,
              "reference": names[0], "accuracy_tasks": list(ACCURACY_TASKS),
              "precisions": {n: summarize(runs[n], ref, rows, p, answer_key) for n, p in opened}}
    fp32_tau = report["precisions"][names[0]]["tau"]
    for entry in report["precisions"].values():
        entry["tau_ratio"] = entry["tau"] / fp32_tau if fp32_tau else None
    out = Path(out) if out else opened[0][1] / "reports" / "calib.json"
    atomic_write_text(out, json.dumps(report, indent=2))
    report["out"] = str(out)
    log(format_table(report))
    log(f"wrote {out}")
    return report


def format_table(report: dict) -> str:
    """One row per precision: τ (and ratio to fp32), greedy agreement, accuracy, size. (CPU tokens/s stay
    in the JSON only: ONNX Runtime's CPU INT8 kernels say little about a GPU's.)"""
    head = f"{'precision':<24}{'tau':>6}{'x fp32':>8}{'match':>8}{'1st div (median)':>18}{'accuracy':>10}{'size MB':>9}"
    lines = [f"{report['prompts']} held-out prompts, tree {report['tree']}, greedy; accuracy on "
             f"{'/'.join(report['accuracy_tasks'])} questions", head]
    for name, e in report["precisions"].items():
        div = "-" if e["first_divergence_median"] is None else f"{e['first_divergence_median']:.0f}"
        acc = "-" if e["accuracy"] is None else f"{e['accuracy'] * 100:.1f}%"
        lines.append(f"{name:<24}{e['tau']:>6.2f}{e['tau_ratio']:>8.3f}{e['match_rate'] * 100:>7.1f}%{div:>18}"
                     f"{acc:>10}{e['size_bytes'] / 1e6:>9.2f}")
    return "\n".join(lines)
