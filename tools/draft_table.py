"""Every draft kind on one table, measured in one run on the same target and held-out prompts.

    python -m tools.draft_table --target dream_export/assets/demo/vlm --data out/demo-data/heldout.jsonl \
        --limit 40 --draft "DREAM=out/drafts/dream" --draft "self-spec=out/drafts/self-spec" ... \
        --draft "DREAM-S=out/supernet" --subnet "DREAM-S=heads=2,vtc_keep=0.75,layer=22" --out out/draft-table

For each draft, the user's path: `export`, `build --target cpu`, then `bench` on ONNX Runtime twice —
the EAGLE-2 tree 4,6,32 (τ per task) and a chain (the CPU's fastest shape: the end-to-end speedup), each
against autoregressive decoding on the same prompts; the draft's size on disk and the extra device
memory the memory planner counts for it. A supernet draft given a `--subnet` is exported as that
sub-network (`export --subnet`: its heads pruned, its visual keep ratio and feature layer applied by the
runtime). Writes `table.json` and `table.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TASKS_NEEDING_THE_IMAGE = ("count", "color", "position")


def _recipe(draft_dir: Path) -> str:
    """Loss weights, self-feeding and steps as the draft's training record states them (a supernet's: the
    draft it started from and its sub-network phase)."""
    rec = json.loads((draft_dir / "training.json").read_text()) if (draft_dir / "training.json").exists() else {}
    t = rec.get("train_config", {})
    if not t:
        return "?"
    # the losses the trainer applies for this arch (draft.train.distill_loss): EAGLE-3 has no feature
    # regression, only DREAM regresses its first block
    arch = (rec.get("draft_config") or {}).get("arch", "dream")
    w = f"logits {t.get('w_logits')}"
    if arch != "eagle3":
        w += f", {'imitation' if arch == 'self-spec' else 'feature'} {t.get('w_feature')}"
    if arch == "dream" and t.get("w_mid"):
        w += f", mid {t['w_mid']}"
    sn = draft_dir / "supernet.json"
    tr = json.loads(sn.read_text()).get("training") if sn.exists() else None
    if tr:
        start = f"from {tr['init']}" if tr.get("init") else f"{tr.get('phase1_steps')} full-network steps"
        return f"{w}; supernet: {start} + {tr.get('phase2_steps')} sub-network steps"
    return f"{w}; {'self-feed' if t.get('self_feed') else 'no self-feed'}; {t.get('steps')} steps"


def split_shape(subnet: str) -> tuple[str, int | None]:
    """(sub-network for `export --subnet`, chain depth) of a searched configuration that may end in the
    drafting shape the search chose (",tree=1,D,D+1": a chain of depth D); depth None without one."""
    m = re.search(r"(?:^|,)tree=1,(\d+),(\d+)$", subnet)
    if m is None:
        return subnet, None
    return subnet[: m.start()], int(m.group(1))


def _by_task(summary: dict) -> dict[str, float]:
    by_task: dict[str, list[float]] = {}
    for p in summary["per_prompt"]:
        by_task.setdefault(p.get("task") or "all", []).append(p["tau"])
    return {t: sum(v) / len(v) for t, v in sorted(by_task.items())}


def _draft_bytes(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("onnx/draft"))


def _extra_memory(bundle: Path, target: str, precision: str) -> int:
    from dream_export.export.sources import source_configs
    from dream_export.export.subnet import SUBNET_DRAFT_DIR
    from dream_export.targets.memory import DraftDesc, describe_model, estimate

    m = json.loads((bundle / "manifest.json").read_text())
    cfg, draft_cfg = source_configs(m, bundle)
    sub = bundle / SUBNET_DRAFT_DIR / "draft_config.json"  # an exported sub-network: its pruned heads
    if sub.exists():
        draft_cfg = json.loads(sub.read_text())
    model, draft = describe_model(cfg), DraftDesc.from_config(draft_cfg)
    plan = estimate(model, target, precision, m["kv_capacity"], m["max_tree"], draft)
    parts = plan.breakdown()
    return parts["draft_weights"] + parts["draft_cache"]


def measure(target_dir: Path, drafts: dict[str, Path], data: Path, limit: int, out: Path,
            memory_target: str = "jetson-orin-nano-8gb", memory_precision: str = "fp16",
            subnets: dict[str, str] | None = None, threads: int = 1, chain_depths: dict[str, int] | None = None
            ) -> dict:
    """Run every measurement for every draft (`subnets`: draft name → the sub-network to export of a
    supernet draft; `chain_depths`: draft name → its CPU chain's depth, when not the default); returns
    the JSON the table is made from."""
    from PIL import Image  # noqa: F401  (fail early when the export extra is missing)

    from dream_export.core.prompts import read_prompts
    from dream_export.draft.train import load_draft_config
    from dream_export.export.bundle import ExportOptions, export_bundle
    from dream_export.runtime.bench import bench
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.tree import TreeSpec
    from dream_export.targets.cpu_build import build_cpu

    tree = TreeSpec(4, 6, 32)
    rows = read_prompts(data)[:limit]
    results: dict = {"prompts": len(rows), "tree": [tree.k, tree.depth, tree.total], "drafts": {}}
    subnets = subnets or {}
    for name, d in drafts.items():
        bundle = out / "bundles" / name.replace(" ", "_").replace("/", "_")
        # a searched configuration's chain depth becomes its chain graph's (the others keep the default)
        subnet, depth = split_shape(subnets[name]) if name in subnets else (None, None)
        depth = (chain_depths or {}).get(name, depth)
        steps = ExportOptions().chain_steps if depth is None else depth - 1
        manifest = export_bundle(target_dir, d, bundle,
                                 ExportOptions(kv_capacity=192, max_tree=32, subnet=subnet, chain_steps=steps),
                                 log=lambda *_: None)
        precision = "cpu"
        try:
            build_cpu(bundle, threads=threads, log=lambda *_: None)
        except Exception as e:  # noqa: BLE001  (recorded in the table: the draft then runs its fp32 graphs)
            precision = f"fp32 (cpu build failed: {str(e).splitlines()[0][:120]})"
        pipe = Pipeline.load(bundle, threads=threads, precision="cpu" if precision == "cpu" else "fp32")
        chain = TreeSpec.chain(manifest["graphs"].get("draft_chain", {}).get("steps", steps) + 1)
        s = bench(pipe, rows, tree=chain, mode="chain")
        t = bench(pipe, rows, tree=tree, mode="tree")
        results["drafts"][name] = {
            "dir": str(d), "arch": load_draft_config(d).arch, "recipe": _recipe(d), "precision": precision,
            "subnet": (manifest.get("supernet") or {}).get("chosen"),
            "tree_tau": t["tau"], "tree_tau_by_task": _by_task(t), "tree_match": t["match_rate"],
            "tree_speedup": t["speedup"],
            "chain": [chain.k, chain.depth, chain.total], "chain_tau": s["tau"], "chain_tau_by_task": _by_task(s),
            "speedup": s["speedup"], "decode_speedup": s["decode_speedup"], "chain_match": s["match_rate"],
            "draft_bytes": _draft_bytes(bundle),
            "extra_memory_bytes": _extra_memory(bundle, memory_target, memory_precision),
        }
        print(f"{name}: tree tau {t['tau']:.2f}, chain tau {s['tau']:.2f}, speedup {s['speedup']:.2f}x", flush=True)
    results["memory_target"] = {"target": memory_target, "precision": memory_precision}
    return results


def markdown(res: dict) -> str:
    """The RESULTS table."""
    mt = res["memory_target"]
    chain = res["drafts"][next(iter(res["drafts"]))]["chain"]
    lines = [f"| draft | recipe | τ tree {','.join(map(str, res['tree']))} | count / color / position (tree) "
             f"| τ CPU chain {','.join(map(str, chain))} "
             f"| speedup, chain (ORT CPU) | speedup, tree | greedy match | draft size | extra memory "
             f"({mt['target']}, {mt['precision']}) |", "|" + "---|" * 10]
    for name, r in res["drafts"].items():
        img = " / ".join(f"{r['tree_tau_by_task'].get(t, float('nan')):.2f}" for t in TASKS_NEEDING_THE_IMAGE)
        match = min(r["tree_match"], r["chain_match"])
        note = "" if r["precision"] == "cpu" else " (fp32 graphs)"
        if r.get("subnet"):  # a supernet's exported sub-network
            c = r["subnet"]
            note += f" [{c['heads']} heads, visual keep {c['vtc_keep']:g}, layer {c['layer']}]"
        shape = "" if r["chain"] == chain else f" (chain {','.join(map(str, r['chain']))})"
        lines.append(f"| {name}{note} | {r['recipe']} | {r['tree_tau']:.2f} | {img} | {r['chain_tau']:.2f}{shape} "
                     f"| {r['speedup']:.2f}× | {r['tree_speedup']:.2f}× | {match * 100:.0f}% | {r['draft_bytes'] / 2**20:.1f} MiB "
                     f"| {r['extra_memory_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, required=True, help="Target model directory.")
    ap.add_argument("--draft", action="append", required=True, help="NAME=DRAFT_DIR (repeatable).")
    ap.add_argument("--data", type=Path, required=True, help="Held-out prompts (JSONL).")
    ap.add_argument("--subnet", action="append", default=[],
                    help="NAME=SUBNET: export draft NAME (a supernet) as this sub-network, e.g. "
                         "'DREAM-S=heads=2,vtc_keep=0.75,layer=22'; a trailing ',tree=1,D,D+1' (the search's "
                         "drafting shape) makes its CPU chain that deep (repeatable).")
    ap.add_argument("--chain-depth", action="append", default=[],
                    help="NAME=D: draft NAME's CPU chain drafts D tokens per round (default: the export's).")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (build and bench).")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    drafts = {}
    for spec in a.draft:
        name, sep, path = spec.rpartition("=")
        if not sep or not Path(path, "draft_config.json").exists():
            ap.error(f"--draft {spec!r}: expected NAME=DRAFT_DIR with a draft_config.json")
        drafts[name] = Path(path)
    subnets = {}
    for spec in a.subnet:
        name, sep, sub = spec.partition("=")  # the sub-network itself is key=value pairs
        if not sep or name not in drafts or not Path(drafts[name], "supernet.json").exists():
            ap.error(f"--subnet {spec!r}: expected NAME=SUBNET naming a --draft that is a supernet")
        subnets[name] = sub
    depths = {}
    for spec in a.chain_depth:
        name, sep, depth = spec.rpartition("=")
        if not sep or name not in drafts or not depth.isdigit() or int(depth) < 1:
            ap.error(f"--chain-depth {spec!r}: expected NAME=D naming a --draft, D a positive number")
        depths[name] = int(depth)
    a.out.mkdir(parents=True, exist_ok=True)
    res = measure(a.target, drafts, a.data, a.limit, a.out, subnets=subnets, threads=a.threads,
                  chain_depths=depths)
    (a.out / "table.json").write_text(json.dumps(res, indent=2))
    (a.out / "table.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
