"""`dream-export demo`: the main job on the embedded demo VLM, as a sequence of the real commands' steps.

Steps: load the VLM through `from_pretrained` and answer held-out images (torch, for reference);
write the prompt files; export the bundle (`dream-export export`); answer with the torch-free runtime
(`dream-export run`); benchmark speculative against autoregressive decoding (`dream-export bench`).
Each step calls the same function its command calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from dream_export.demo import scenes
from dream_export.errors import UsageError
from dream_export.io import atomic_write_text

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"


def _load(model_dir: Path):
    from dream_export.demo.model import load_demo

    if not (Path(model_dir) / "config.json").exists():
        raise UsageError(f"{model_dir} holds no model (config.json missing); run `make demo-model` to train one")
    return load_demo(model_dir)


def answer_heldout(model, processor, num: int) -> list[dict]:
    """Greedy answers to the first `num` held-out samples (round-robin over tasks), with timing."""
    import torch

    from dream_export.core.prompts import PromptEncoder

    enc = PromptEncoder(processor)
    per_task = max(1, -(-num // len(scenes.TASKS)))
    pool = scenes.heldout(per_task)
    order = [pool[t * per_task + i] for i in range(per_task) for t in range(len(scenes.TASKS))][:num]
    rows = []
    for scene, sample in order:
        inputs = enc.encode([scenes.render(scene)], [sample.prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=128, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        dt = time.perf_counter() - t0
        new = gen[0, inputs["input_ids"].shape[1]:]
        text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        rows.append({"seed": sample.seed, "task": sample.task, "prompt": sample.prompt, "answer": text,
                     "reference": sample.answer, "correct": scenes.answer_key(sample.task, text) == sample.key,
                     "tokens": int(new.numel()), "seconds": round(dt, 4),
                     "tokens_per_s": round(new.numel() / dt, 1)})
    return rows


def run_demo(model_dir: Path, out: Path | None = None, num: int = 5, do_eval: bool = False, per_task: int = 100,
             speculate: bool = True, draft_dir: Path | None = None, bench_prompts: int = 25,
             echo: Callable[[str], None] | None = print) -> dict:
    """Run the demo steps; returns a JSON-able summary."""
    import torch

    torch.set_num_threads(2)
    say = echo or (lambda _s: None)
    t0 = time.perf_counter()
    model, processor = _load(model_dir)
    load_s = time.perf_counter() - t0
    say(f"loaded {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in {load_s:.1f}s")
    summary: dict = {"model": str(model_dir), "load_seconds": round(load_s, 2)}
    if num > 0:
        rows = answer_heldout(model, processor, num)
        for r in rows:
            say(f"\n[{r['task']}] Q: {r['prompt']}\n  A: {r['answer']}\n"
                f"  ({r['tokens']} tokens in {r['seconds'] * 1000:.0f} ms, {r['tokens_per_s']} tok/s with torch; "
                f"{'matches' if r['correct'] else 'differs from'} the reference)")
        summary["answers"] = rows
        summary["tokens_per_s"] = round(sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows), 1)
    if do_eval:
        from dream_export.demo.evaluate import evaluate

        say(f"\nevaluating on the held-out split ({per_task} per task)...")
        t1 = time.perf_counter()
        res = evaluate(model, processor, n_per_task=per_task)
        summary.update(res)
        summary["eval_seconds"] = round(time.perf_counter() - t1, 1)
        say("task        accuracy  exact-answer")
        for task in scenes.TASKS:
            if task in res["accuracy"]:
                say(f"{task:<10}  {res['accuracy'][task]:>8.3f}  {res['exact'][task]:>12.3f}")
    draft_dir = Path(draft_dir) if draft_dir else DEMO_DIR / "draft"
    if speculate and out is not None and (draft_dir / "draft_config.json").exists():
        summary["speculative"] = _speculative_steps(Path(model_dir), draft_dir, Path(out), bench_prompts, say)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "demo.json", json.dumps(summary, indent=2))
        say(f"\nwrote {Path(out) / 'demo.json'}")
    return summary


def _speculative_steps(model_dir: Path, draft_dir: Path, out: Path, bench_prompts: int, say) -> dict:
    """export → run → bench, each through the function its command uses."""
    from dream_export.core.prompts import read_prompts
    from dream_export.demo import data
    from dream_export.export.bundle import ExportOptions, export_bundle
    from dream_export.plots import bench_plot
    from dream_export.runtime.bench import bench
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.tree import TreeSpec
    from dream_export.targets.cpu_build import build_cpu

    out.mkdir(parents=True, exist_ok=True)
    per_task = max(1, -(-bench_prompts // len(scenes.TASKS)))
    heldout = data.write_split(out, "heldout", data.heldout_split(per_task))
    data.write_split(out, "calib", data.train_split(64, base=scenes.CALIB_SEED_BASE))
    say("\nexporting the bundle (dream-export export)...")
    # Demo prompts are ~40 tokens and answers at most 128: a 192-slot cache holds every request (the graphs
    # read only the used slots, so a larger capacity would cost memory, not time).
    manifest = export_bundle(model_dir, draft_dir, out / "bundle", ExportOptions(kv_capacity=192, max_tree=32),
                             log=say)
    say("\nbuilding the CPU variant (dream-export build --target cpu: optimized graphs, 8-bit draft weights)...")
    build_cpu(out / "bundle", threads=1, log=lambda m: say(f"  {m}"))
    # One intra-op thread: on two cores these small graphs run faster single-threaded, for the plain
    # decoder as much as for speculation (`bench --sweep`'s thread sweep; docs/RESULTS.md).
    pipe = Pipeline.load(out / "bundle", threads=1, precision="cpu")
    rows = read_prompts(heldout)[:bench_prompts]
    from PIL import Image

    # On a CPU the verify pass pays per tree token, and a 7th row crosses the CPU matmul's 6-row block:
    # a depth-5 chain, the exported chain graph's, is fastest there (docs/RESULTS.md); GPU backends
    # favour the paper's 32-node tree (the Pipeline default).
    # (an EAGLE-style --draft has no chain graph: the same depth, drafted one call per step)
    tree = TreeSpec.chain(manifest["graphs"].get("draft_chain", {}).get("steps", ExportOptions().chain_steps) + 1)
    r = pipe.generate(Image.open(rows[0]["image"]), rows[0]["prompt"], mode="chain", tree=tree)
    say(f"\nspeculative answer (dream-export run, no torch):\n  Q: {rows[0]['prompt']}\n  A: {r.text}\n"
        f"  (tau {r.stats['tau']:.2f}, {r.stats['tokens_per_s']:.0f} tok/s)")
    say(f"\nbenchmarking on {len(rows)} held-out prompts (dream-export bench)...")
    s = bench(pipe, rows, tree=tree, mode="chain")
    atomic_write_text(out / "bench.json", json.dumps(s, indent=2))
    bench_plot(s, out / "bench.png")
    say(f"\n{'':<28}{'speculative':>12}{'autoregressive':>16}")
    say(f"{'tokens/s':<28}{s['spec_tokens_per_s']:>12.1f}{s['ar_tokens_per_s']:>16.1f}")
    say(f"speedup {s['speedup']:.2f}x (decode {s['decode_speedup']:.2f}x), tau {s['tau']:.2f}, "
        f"greedy match {s['match_rate'] * 100:.0f}%, host {s['host_fraction'] * 100:.1f}% of decode")
    say(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return {k: s[k] for k in ("speedup", "decode_speedup", "tau", "match_rate", "host_fraction",
                              "spec_tokens_per_s", "ar_tokens_per_s")} | {"export_seconds": manifest["export_seconds"]}
