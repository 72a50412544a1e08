"""Latency-model reports for the CLI: predicted tokens/s across targets (`plan --target all`) and
predicted-vs-measured per-call tables and plots (`profile`)."""

from __future__ import annotations

import dataclasses

from dream_export.errors import UsageError
from dream_export.runtime.tree import TreeSpec
from dream_export.targets.latency import Capacities, fmt_rate, predict_target
from dream_export.targets.memory import DraftDesc, ModelDesc, plan_memory
from dream_export.targets.registry import Target, all_targets

# DREAM paper, LLaVA-1.6-7B on A100, tree k 4 / depth 6 / 32 nodes as its code counts depth (4,7,32
# here, see TreeSpec), temperature 0 (average over six benchmarks).
DEFAULT_TAU = 5.51


def fit_tree(tree: TreeSpec, max_tree: int) -> TreeSpec:
    """`tree` with its node count capped at what the graphs can verify."""
    return tree if tree.total <= max_tree else dataclasses.replace(tree, total=max_tree)


def predict_all_targets(model: ModelDesc, precision: str, tree: TreeSpec, tau: float,
                        draft: DraftDesc | None = None, capacities: Capacities | None = None,
                        targets: tuple[Target, ...] | None = None) -> list[dict]:
    """One row per GPU target: whether the model fits (memory planner) and, where it does, the predicted
    decode rates. `capacities` fixes the buffers (a bundle's); otherwise each target's plan chooses."""
    rows = []
    for tgt in targets or tuple(t for t in all_targets() if t.kind != "cpu"):
        row: dict = {"target": tgt.name, "precision": precision}
        if not tgt.supports(precision):
            rows.append({**row, "fits": False, "note": f"no {precision} on {tgt.name}"})
            continue
        try:
            plan = plan_memory(model, tgt, precision, draft=draft,
                               kv_capacity=capacities.kv_capacity if capacities else None)
        except UsageError as e:
            rows.append({**row, "fits": False, "note": str(e).split(";")[0]})
            continue
        caps = capacities or Capacities.from_plan(plan.kv_capacity, plan.tree_size)
        pred = predict_target(model, caps, tgt, precision, fit_tree(tree, caps.max_tree), tau, draft)
        rows.append({**row, "fits": True, "kv_capacity": caps.kv_capacity, "tree": pred["tree"],
                     "spec_tokens_per_s": pred["spec_tokens_per_s"], "ar_tokens_per_s": pred["ar_tokens_per_s"],
                     "speedup": pred["speedup"], "verify_ms": pred["calls"][f"target verify ({pred['tree']['total']} "
                                                                          "tok)"]["seconds"] * 1e3})
    return rows


def format_all_targets(rows: list[dict], model_name: str, tau: float) -> str:
    """The cross-target table of `predict_all_targets`."""
    lines = [f"predicted decode rates of {model_name} (tau {tau:g}; roofline lower bound on latency):",
             f"  {'target':<28}{'prec':<6}{'KV':>6}{'tree':>9}{'verify ms':>11}{'AR tok/s':>10}{'spec tok/s':>12}"
             f"{'speedup':>9}"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"  {r['target']:<28}{r['precision']:<6}  -- {r['note']}")
            continue
        t = r["tree"]
        lines.append(f"  {r['target']:<28}{r['precision']:<6}{r['kv_capacity']:>6}"
                     f"{str(t['k']) + ',' + str(t['depth']) + ',' + str(t['total']):>9}{r['verify_ms']:>11.2f}"
                     f"{fmt_rate(r['ar_tokens_per_s']):>10}{fmt_rate(r['spec_tokens_per_s']):>12}"
                     f"{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def compare(pred: dict, measured: dict[str, float]) -> dict:
    """Predicted vs measured seconds per call, and both decode rates (the same formula on each)."""
    tree = TreeSpec(**pred["tree"])
    rows = []
    for label, c in pred["calls"].items():
        m = measured.get(label)
        rows.append({"call": label, "predicted_s": c["seconds"], "measured_s": m, "bound": c["bound"],
                     "ratio": (m / c["seconds"]) if m else None})
    by = {r["call"].split(" (")[0]: r["measured_s"] for r in rows}
    rate = None
    if all(by.get(k) for k in ("target verify", "draft tree step", "draft context", "target decode")):
        round_s = by["target verify"] + (tree.depth - 1) * by["draft tree step"] + by["draft context"]
        spec, ar = pred["tau"] / round_s, 1.0 / by["target decode"]
        rate = {"spec_tokens_per_s": spec, "ar_tokens_per_s": ar, "speedup": spec / ar}
    return {"rows": rows, "predicted_rate": {k: pred[k] for k in ("spec_tokens_per_s", "ar_tokens_per_s", "speedup")},
            "measured_rate": rate, "tau": pred["tau"], "tree": pred["tree"], "target": pred["target"],
            "peaks": pred["peaks"]}


def format_compare(cmp: dict) -> str:
    """Predicted-vs-measured table for the terminal."""
    lines = [f"latency model vs measured on {cmp['target']} (peaks: {cmp['peaks']['bandwidth_gbs']:.1f} GB/s, "
             f"{cmp['peaks']['gemm_tflops']:.3f} TFLOPS, {cmp['peaks']['source']}):",
             f"  {'call':<28}{'predicted ms':>14}{'measured ms':>13}{'meas/pred':>11}  bound"]
    for r in cmp["rows"]:
        m = f"{r['measured_s'] * 1e3:>13.3f}" if r["measured_s"] else f"{'-':>13}"
        ratio = f"{r['ratio']:>10.2f}x" if r["ratio"] else f"{'-':>11}"
        lines.append(f"  {r['call']:<28}{r['predicted_s'] * 1e3:>14.3f}{m}{ratio}  {r['bound']}")
    p, m = cmp["predicted_rate"], cmp["measured_rate"]
    t = cmp["tree"]
    lines.append(f"  decode at tau {cmp['tau']:.2f}, tree {t['k']},{t['depth']},{t['total']}: predicted "
                 f"{fmt_rate(p['spec_tokens_per_s'])} tok/s speculative, {fmt_rate(p['ar_tokens_per_s'])} "
                 f"autoregressive (x{p['speedup']:.2f})")
    if m:
        lines.append(f"  {'':<36}measured  {fmt_rate(m['spec_tokens_per_s'])} tok/s speculative, "
                     f"{fmt_rate(m['ar_tokens_per_s'])} autoregressive (x{m['speedup']:.2f}; graph time only)")
    return "\n".join(lines)


def plot_compare(ax, cmp: dict) -> None:
    """Horizontal bars of predicted and measured ms per call on one matplotlib axis (log scale)."""
    labels = [r["call"] for r in cmp["rows"]]
    ys = range(len(labels))
    ax.barh([y + 0.2 for y in ys], [r["predicted_s"] * 1e3 for r in cmp["rows"]], height=0.4, color="#bbbbbb",
            label="predicted (roofline)")
    ax.barh([y - 0.2 for y in ys], [(r["measured_s"] or 0) * 1e3 for r in cmp["rows"]], height=0.4,
            color="#4477aa", label="measured")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels)
    ax.set_xscale("log")
    ax.set_xlabel("ms per call")
    ax.set_title(f"latency model vs measured ({cmp['target']})")
    ax.legend(loc="lower right")

