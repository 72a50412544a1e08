"""Command-line pieces of DREAM-S supernets: `train-draft --supernet`, `export --subnet` and `search`."""

from __future__ import annotations

import json
from pathlib import Path

import click


def supernet_options(f):
    """`train-draft`'s supernet options."""
    for opt in reversed([
        click.option("--supernet", is_flag=True,
                     help="Train a DREAM-S supernet: elastic last-block heads, visual keep ratio and injected "
                          "target layer (one of the last five; the features carry those layers)."),
        click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="With --supernet: start from this full DREAM draft instead of a phase 1 of --steps."),
        click.option("--supernet-steps", default=1000, show_default=True,
                     help="With --supernet: phase-2 steps (one random sub-network each)."),
    ]):
        f = opt(f)
    return f


def supernet_taps(text_cfg, arch: str, no_cross: bool) -> tuple[int, ...]:
    """The target layers a supernet's features carry (the last five but the final one), after checking
    that the draft can be one."""
    from dream_export.draft.supernet import last_layers
    from dream_export.errors import UsageError

    if arch != "dream" or no_cross:
        raise UsageError("--supernet trains a DREAM draft (with cross-attention): drop --arch/--no-cross")
    return tuple(last_layers(text_cfg.num_hidden_layers)[:-1])


def train_supernet_cmd(target, feat_dir: Path, cfg, tcfg, init: Path | None, supernet_steps: int, out: Path,
                       log) -> None:
    """Run both phases (phase 1: `tcfg.steps`, skipped with `init`) and save the supernet to `out`."""
    from dream_export.draft.supernet import SupernetTrainConfig, train_supernet

    scfg = SupernetTrainConfig(phase1_steps=0 if init else tcfg.steps, phase2_steps=supernet_steps, seed=tcfg.seed)
    dec = target.side.decoder
    _, spec = train_supernet(feat_dir, target.model.lm_head.weight, dec.lm.norm, dec.n_layers, cfg, tcfg, scfg,
                             init=init, out_dir=out, log=log)
    log(f"saved supernet draft to {out} ({spec.training['minutes']} min; head order {spec.head_order}, "
        f"layers {spec.layers})")


def subnet_option(f):
    """`export`'s choice of a supernet's sub-network."""
    return click.option(
        "--subnet", default=None, metavar="heads=N,vtc_keep=R,layer=L[,tree=K,D,T]",
        help="With a supernet draft: export only this sub-network (its last block's heads physically pruned; "
             "heads may be a keep ratio such as 0.5; omitted knobs stay full; tree: the drafting shape run, "
             "bench and serve then use by default, K=1 a chain). Without it, a supernet exports every head "
             "variant for `dream-export search` (which prints the --subnet text of its choice).")(f)


def subnet_draft_dir(out: Path, draft_dir: Path, subnet: str | None) -> Path:
    """The draft a bundle's graphs were made from (a sub-network's pruned draft is saved in the bundle)."""
    from dream_export.export.subnet import SUBNET_DRAFT_DIR

    return out / SUBNET_DRAFT_DIR if subnet else draft_dir


def _table(title: str, rows: list[dict], chosen: dict, full: dict) -> None:
    click.echo(title)
    click.echo(f"  {'configuration':<32}{'prompts':>8}{'tau':>7}{'ms/round':>10}{'AR steps':>9}{'tok/s':>10}"
               f"{'speedup':>9}")
    for r in rows:
        mark = " <- chosen" if r["config"] == chosen["config"] else (" (full)" if r["config"] == full["config"] else "")
        click.echo(f"  {r['label']:<32}{r['prompts']:>8}{r['tau']:>7.2f}{r['round_seconds'] * 1e3:>10.3f}"
                   f"{r['round_cost']:>9.3f}{r['tokens_per_s']:>10.1f}{r['speedup']:>8.2f}x{mark}")


@click.command("search")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", "target_names", required=True, multiple=True,
              help="Hardware target (`dream-export targets`): cpu measures this machine with ONNX Runtime, any "
                   "other is costed by its roofline latency model. Repeatable: modelled targets share the "
                   "runtime's answers; --json/--plot then get the target's name appended, and no choice is "
                   "written.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help='JSONL of {"image": path, "prompt": text}: the prompts every candidate answers.')
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="τ against seconds per round, the front and the choice marked (PNG).")
@click.option("--seed", default=0, show_default=True, help="Order of the prompts and of the candidates' runs.")
@click.option("--budget", "budget_s", default=1200.0, show_default=True,
              help="Seconds: a successive-halving rung that would not fit is not started.")
@click.option("--first-rung", default=2, show_default=True, help="Prompts every candidate answers first.")
@click.option("--max-prompts", default=16, show_default=True, help="Prompts the last survivors answer.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--threads", default="1", show_default=True, help="ONNX Runtime intra-op threads per graph.")
@click.option("--precision", default=None, help="Precision the latency model assumes (default: fp16 on GPUs).")
@click.option("--cost-as", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A VLM config.json: cost the measured answers as if the pair had that model's size (a "
                   "forecast for the deployment the bundle stands in for; GPU targets).")
@click.option("--shapes", default=None, metavar="'K,D,T K,D,T ...'",
              help="Drafting shapes to search (chains: K=1), space-separated [chains of depth 3-16 and EAGLE-2 trees "
                   "of 32-192 nodes, those within the bundle's max_tree]; the bundle's chain is always one. "
                   "'none': only the bundle's chain.")
@click.option("--dry-run", is_flag=True, help="Do not write the choice into the bundle.")
def search_cmd(bundle: Path, target_names: tuple[str, ...], data_path: Path, json_out: Path | None, plot_out: Path | None,
               seed: int, budget_s: float, first_rung: int, max_prompts: int, max_new_tokens: int, threads: str,
               precision: str | None, cost_as: Path | None, shapes: str | None, dry_run: bool) -> None:
    """Measure a supernet bundle's sub-networks on the prompts, print the Pareto front, and write the
    configuration with the most expected tokens/s on TARGET into the bundle (the runtime then uses it)."""
    from dream_export.core.prompts import read_prompts
    from dream_export.io import atomic_write_text
    from dream_export.runtime.bundle import Bundle
    from dream_export.targets.registry import get_target
    from dream_export.targets.search import cost_model, search, write_choice

    rows, runs, results = read_prompts(data_path), {}, []
    cost_cfg = json.loads(cost_as.read_text()) if cost_as else None
    if cost_cfg is not None:  # reports name the costed model as a hub checkpoint would, else by its file
        cost_cfg.setdefault("_name_or_path", cost_as.stem)
    manifest = Bundle.open(bundle).manifest
    for target_name in target_names:  # every target's costing is checked before the first answer
        cost_model(manifest, bundle, get_target(target_name), precision, cost_cfg)
    for target_name in target_names:
        res = search(bundle, target_name, rows, seed=seed, budget_s=budget_s, first_rung=first_rung,
                     max_prompts=max_prompts, max_new_tokens=max_new_tokens,
                     threads=int(threads) if threads.isdigit() else threads, precision=precision,
                     cost_as=cost_cfg,
                     shapes=None if shapes is None else [] if shapes.strip() == "none" else shapes.split(),
                     runs=runs, log=click.echo)
        _report(res)
        results.append(res)
        if len(target_names) > 1:
            click.echo(f"{len(target_names)} targets: the choice is not written (search one target to write it)")
        elif not dry_run:
            write_choice(bundle, res)
            click.echo(f"wrote the choice into {bundle / 'manifest.json'}")

        def named(path: Path, target: str = target_name) -> Path:
            return path if len(target_names) == 1 else path.with_name(f"{path.stem}-{target}{path.suffix}")

        if json_out:
            atomic_write_text(named(json_out), json.dumps(res, indent=2))
        if plot_out:
            from dream_export.plots import search_plot

            search_plot(res, named(plot_out))
    if len(results) > 1:
        _compare(results)


def _compare(results: list[dict]) -> None:
    """The targets' choices side by side, with where each chosen request's time goes and which term bounds
    the calls that differ between configurations (the why of different choices)."""
    from dream_export.runtime.tree import TreeSpec

    click.echo("choices per target (the same answers, each target's costs; ms per request of the chosen):")
    for r in results:
        c, split = r["chosen"], r["chosen"].get("split") or {}
        parts = ", ".join(f"{k} {v * 1e3:,.1f}" for k, v in split.items())
        click.echo(f"  {r['target']:<24} {c['label']:<30} {c['speedup']:.2f}x (full draft {r['full']['speedup']:.2f}x)"
                   + (f"; {parts}" if parts else ""))
    if not all("bounds" in r for r in results):
        return
    verify = {f"target verify ({TreeSpec.parse(r['chosen']['config']['tree']).total} tok)" for r in results}
    keys = [k for k in results[0]["bounds"] if k.startswith(("target prefill", "target decode", "draft prompt pass"))
            or k in verify or k.startswith("draft step") and k.endswith(f"h{results[0]['full']['config']['heads']}")]
    click.echo("  " + f"{'call':<40}" + "".join(f"{r['target']:>30}" for r in results))
    for k in keys:
        cells = [r["bounds"].get(k) for r in results]
        click.echo(f"  {k:<40}" + "".join(f"{b['seconds'] * 1e3:>11.3f} ms {b['bound'] + '-bound':>15}" if b else f"{'-':>30}"
                                       for b in cells))


def _report(res: dict) -> None:
    c, f = res["chosen"], res["full"]
    _table(f"Pareto front on {res['target']} ({res['cost']}; τ up, a round's time in AR steps down):", res["front"],
           c, f)
    _table(f"last rung ({res['finalists'][0]['prompts']} prompts each):", res["finalists"], c, f)
    _table(f"the last rung's best against the full draft ({c['prompts']} prompts each, measured together):",
           res["head_to_head"], c, f)
    click.echo(f"chosen {c['label']} (export --subnet {c['subnet']}): {c['speedup']:.2f}x, {c['tokens_per_s']:.1f} "
               f"tok/s; full draft {f['speedup']:.2f}x, {f['tokens_per_s']:.1f} tok/s (same prompts, same run); "
               f"outputs {'lossless' if res['lossless'] else 'NOT lossless'}; {res['wall_seconds']:.0f}s")
    for call, b in res.get("bounds", {}).items():
        click.echo(f"  {call:<40} {b['seconds'] * 1e6:10.1f} us  {b['bound']}-bound")
