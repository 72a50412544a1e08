"""The `dream-export` command line: one click group, one small function per command.

Expected failures (`DreamExportError`) print a short message and exit 2; anything else is a bug and
exits 1, with the traceback only under `--debug`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from dream_export import __version__
from dream_export.errors import DreamExportError, MissingBackendError, UsageError, from_os_error
from dream_export.export.sources import source_configs
from dream_export.options import LOAD_DTYPES, tree_option, vtc_score_option
from dream_export.runtime.tree import TreeSpec
from dream_export.supernet_cli import (
    search_cmd,
    subnet_draft_dir,
    subnet_option,
    supernet_options,
    supernet_taps,
    train_supernet_cmd,
)

DEMO_DIR = Path(__file__).parent / "assets" / "demo"


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingBackendError(
            f"this command needs the export extra ({e.name} is missing): pip install 'dream-export[export]'"
        ) from e


def _emit_json(obj: dict) -> None:
    # The JSON object is always the last line, so scripts can `tail -n1 | jq`.
    click.echo(json.dumps(obj, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dream-export")
@click.option("--debug", is_flag=True, help="Show full tracebacks for unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Export, build and run DREAM speculative decoding of vision-language models.

    `dream-export demo --out DIR` runs the main job end to end on the embedded demo VLM (answer,
    export, run, benchmark); the other commands are its steps, for your own models and drafts.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # calib-report scores the demo's counting and colour questions as the demo's own evaluation does
    ctx.obj["answer_key"] = _demo_answer_key


def _demo_answer_key(task: str, text: str) -> str:
    from dream_export.demo.scenes import answer_key

    return answer_key(task, text)


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEMO_DIR / "vlm", show_default="the embedded demo VLM", help="VLM directory to use.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the demo's artifacts (answers, evaluation) here.")
@click.option("-n", "--num", default=5, show_default=True, help="How many held-out images to answer.")
@click.option("--eval", "do_eval", is_flag=True, help="Evaluate on the whole held-out split (per-task accuracy).")
@click.option("--per-task", default=100, show_default=True, help="Held-out samples per task for --eval.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
@click.option("--draft", "draft_dir", type=click.Path(file_okay=False, path_type=Path), default=DEMO_DIR / "draft",
              show_default="the embedded demo draft", help="Draft for the speculative steps.")
@click.option("--speculate/--no-speculate", default=True, show_default=True,
              help="With --out: export the bundle, answer with the runtime and benchmark against AR decoding.")
@click.option("--bench-prompts", default=25, show_default=True, help="Held-out prompts for the benchmark.")
def demo(model_dir: Path, out: Path | None, num: int, do_eval: bool, per_task: int, as_json: bool, draft_dir: Path,
         speculate: bool, bench_prompts: int) -> None:
    """Run the main job on the embedded demo VLM.

    Answers held-out images with the VLM; with --out also exports the bundle to OUT/bundle, writes
    OUT/heldout.jsonl and OUT/calib.jsonl, answers with the torch-free runtime and benchmarks
    speculative against autoregressive decoding (OUT/bench.json, OUT/bench.png). With --eval, scores
    the VLM on the fixed held-out split: the share of answers whose first clause (the count, the
    colour, the number read, ...) matches the reference exactly.
    """
    _need_torch()
    from dream_export.demo import pipeline

    summary = pipeline.run_demo(model_dir, out=out, num=num, do_eval=do_eval, per_task=per_task,
                                speculate=speculate, draft_dir=draft_dir, bench_prompts=bench_prompts,
                                echo=None if as_json else click.echo)
    if as_json:
        _emit_json(summary)


@cli.command("demo-model")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=DEMO_DIR / "vlm",
              show_default="the embedded demo VLM", help="Where to write the trained VLM.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recorded recipe).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
def demo_model(out: Path, steps: int | None, seed: int, threads: int) -> None:
    """Regenerate the demo VLM from scratch: data, tokenizer, weights (reproducible by seed)."""
    _need_torch()
    from dream_export.demo.train import TrainConfig, train_demo_vlm

    cfg = TrainConfig(seed=seed, threads=threads)
    if steps is not None:
        cfg.steps = steps
    t0 = time.time()
    record = train_demo_vlm(out, cfg, log=click.echo)
    click.echo(f"done in {(time.time() - t0) / 60:.1f} min; held-out accuracy: {record['heldout']['accuracy']}")


@cli.command("demo-data")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--heldout-per-task", default=20, show_default=True)
@click.option("--calib", "n_calib", default=64, show_default=True, help="Calibration prompts.")
@click.option("--train", "n_train", default=2000, show_default=True, help="Draft-training prompts.")
def demo_data(out: Path, heldout_per_task: int, n_calib: int, n_train: int) -> None:
    """Write the demo's prompt files: heldout.jsonl, calib.jsonl and train.jsonl (+ images/)."""
    from dream_export.demo import data, scenes

    paths = [data.write_split(out, "heldout", data.heldout_split(heldout_per_task)),
             data.write_split(out, "calib", data.train_split(n_calib, base=scenes.CALIB_SEED_BASE)),
             data.write_split(out, "train", data.train_split(n_train))]
    for p in paths:
        click.echo(f"wrote {p} ({sum(1 for _ in p.open())} prompts)")


@cli.command("train-draft")
@click.argument("target_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help='JSONL of {"image": path, "prompt": text}; the target answers each prompt itself.')
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Draft directory.")
@click.option("--arch", type=click.Choice(["dream", "eagle2", "eagle3", "self-spec"]), default="dream", show_default=True,
              help="self-spec: the target's own first layers + a small imitation network (no separate draft).")
@click.option("--exit-layer", type=int, default=None,
              help="self-spec: decoder layers of the target the draft runs (default: a sixth of them).")
@click.option("--imitation-blocks", type=click.IntRange(1, 2), default=1, show_default=True,
              help="self-spec: blocks of the imitation network.")
@click.option("--steps", default=2500, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Feature cache directory (default: OUT.features); reused and resumed across runs.")
@click.option("--mid-select", type=click.Choice(["dream", "dream-s", "dream-s-code"]), default="dream",
              show_default=True,
              help="Intermediate-feature selection: DREAM (min entropy, layers 1..0.4L), DREAM-S as in its paper "
                   "(entropy + cross-layer change, layers 1..0.98L-2) or as in its stored code (min entropy, same "
                   "window).")
@click.option("--vtc-keep", type=float, default=None, help="Train on visual-token-compressed streams (e.g. 0.75).")
@click.option("--no-cross", is_flag=True, help="Ablation: drop the cross-attention block.")
@click.option("--no-self-feed", is_flag=True, help="Skip the second pass on the draft's own predictions.")
@click.option("--weights", default="1.0,0.2,0.2", show_default=True, help="Loss weights logits,feature,mid.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint beside OUT.")
@click.option("--threads", default=2, show_default=True,
              help="torch CPU threads for feature capture and training (1 on a machine busy with other work).")
@supernet_options
def train_draft_cmd(target_dir: Path, data_path: Path, out: Path, arch: str, exit_layer: int | None,
                    imitation_blocks: int, steps: int, batch_size: int, lr: float,
                    features: Path | None, mid_select: str, vtc_keep: float | None, no_cross: bool,
                    no_self_feed: bool, weights: str, seed: int, resume: bool, threads: int, supernet: bool,
                    init: Path | None, supernet_steps: int) -> None:
    """Train a DREAM (or EAGLE-2/3 style, or self-speculative) draft for TARGET_DIR by distillation on its
    own answers."""
    _need_torch()
    import torch

    from dream_export.core.prompts import read_prompts
    from dream_export.draft.config import DraftConfig
    from dream_export.draft.data import DataConfig, generate_features, target_identity
    from dream_export.draft.target import load_target
    from dream_export.draft.train import DraftTrainConfig, train_draft

    try:
        w = [float(x) for x in weights.split(",")]
        assert len(w) == 3
    except (ValueError, AssertionError) as e:
        raise click.BadParameter("--weights takes three numbers: logits,feature,mid") from e
    text_cfg = _text_config(target_dir)
    extra = {}
    if arch == "self-spec":
        extra = {"imitation_blocks": imitation_blocks, **({} if exit_layer is None else {"exit_layer": exit_layer})}
        no_self_feed = True  # it reads no target features: there is nothing of its own to feed back
    elif exit_layer is not None:
        raise click.BadParameter("--exit-layer applies to --arch self-spec only", param_hint="--exit-layer")
    cfg = DraftConfig.from_target(text_cfg, arch=arch, cross_attention=not no_cross, **extra)
    rows = read_prompts(data_path)
    # Features always carry the EAGLE-3 taps, so every draft architecture trains on one feature cache
    # (a supernet's: the last layers, one of which its cross-attention reads).
    taps = tuple(DraftConfig.from_target(text_cfg, arch="eagle3").fuse_layers)
    torch.set_num_threads(threads)
    if supernet:
        taps = supernet_taps(text_cfg, arch, no_cross)
    target = load_target(target_dir, taps=taps)
    feat_dir = features or out.with_name(out.name + ".features")
    dcfg = DataConfig(mid_select=mid_select, taps=taps)
    generate_features(target.model, target.processor, rows, feat_dir, dcfg, target_identity(target_dir))
    tcfg = DraftTrainConfig(steps=steps, batch_size=batch_size, lr=lr, vtc_keep=vtc_keep, self_feed=not no_self_feed,
                            w_logits=w[0], w_feature=w[1], w_mid=w[2], seed=seed, threads=threads)
    if supernet:
        train_supernet_cmd(target, feat_dir, cfg, tcfg, init, supernet_steps, out, click.echo)
        return
    if arch == "self-spec":
        from dream_export.draft.selfspec_train import train_selfspec

        _, record = train_selfspec(feat_dir, target, cfg, tcfg, out_dir=out, log=click.echo, resume=resume)
    else:
        _, record = train_draft(feat_dir, target.model.lm_head.weight, cfg, tcfg, out_dir=out, log=click.echo,
                                resume=resume)
    click.echo(f"saved {arch} draft to {out} ({record['train_minutes']} min)")


@cli.command("eval-draft")
@click.argument("target_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--draft", "drafts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Draft directory (repeatable); named by its folder name.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@tree_option(help="K,DEPTH,TOTAL of the EAGLE-2 tree.")
@click.option("--chain", is_flag=True, help="Also evaluate chain drafting (depth = tree depth).")
@click.option("--vtc-keep", type=float, default=None, help="Visual-token keep ratio for the draft stream.")
@vtc_score_option
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N prompts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def eval_draft_cmd(target_dir: Path, drafts: tuple, data_path: Path, tree: TreeSpec, chain: bool, vtc_keep: float | None,
                   vtc_score: str, max_new_tokens: int, limit: int | None, json_out: Path | None) -> None:
    """Mean acceptance length τ of drafts with the torch reference decoder (greedy), per task."""
    _need_torch()
    from dream_export.draft.evaluate import evaluate_drafts
    from dream_export.draft.target import load_target
    from dream_export.draft.train import load_draft, load_draft_config
    from dream_export.io import atomic_write_text

    spec = tree
    configs = [load_draft_config(d) for d in drafts]
    taps = next((tuple(c.fuse_layers) for c in configs if c.arch == "eagle3"), ())
    target = load_target(target_dir, taps=taps)
    loaded = {Path(d).name: load_draft(d, target) for d in drafts}
    modes = ("tree", "chain") if chain else ("tree",)
    res = evaluate_drafts(target, loaded, data_path, spec, max_new_tokens, modes, vtc_keep, limit, vtc_score=vtc_score)
    tasks = sorted({t for r in res["results"].values() for m in r.values() for t in m["tau_by_task"]})
    click.echo(f"{'draft':<16}{'mode':<7}{'tau':>6}{'match':>7}  " + "".join(f"{t:>10}" for t in tasks))
    for name, per_mode in res["results"].items():
        for mode, r in per_mode.items():
            click.echo(f"{name:<16}{mode:<7}{r['tau']:>6.2f}{r['match_rate']:>7.2f}  "
                       + "".join(f"{r['tau_by_task'].get(t, float('nan')):>10.2f}" for t in tasks))
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=2))


@cli.command("export")
@click.argument("target_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--draft", "draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory.")
@click.option("--kv-capacity", default=512, show_default=True, help="Tokens the runtime-owned KV cache holds.")
@click.option("--max-tree", default=64, show_default=True, help="Largest tree (nodes) a verify pass may carry.")
@click.option("--taps", default="", help="Extra target layers to expose, e.g. 3,7 (final is always exported).")
@click.option("--no-attn-scores", is_flag=True, help="Omit the last-layer attention importance output (VTC).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 also writes onnx-fp16/ (sensitive ops kept in fp32) beside the fp32 graphs.")
@click.option("--chain-steps", default=4, show_default=True,
              help="Greedy chain steps unrolled into one draft_chain graph (DREAM drafts; 0 = none). The ONNX "
                   "Runtime backend uses it for chains of depth STEPS+1 instead of one draft call per token "
                   "(4: depth 5, whose 6-row verify is the fastest on CPUs).")
@click.option("--min-trt", default="8.5", show_default=True, help="Oldest TensorRT the graphs must parse in.")
@click.option("--skip-check", is_flag=True, help="Do not run parity and the TensorRT lint after exporting.")
@click.option("--dtype", type=click.Choice(LOAD_DTYPES), default="auto", show_default=True,
              help="Dtype the target's weights load in (auto: the checkpoint's own); the graphs are fp32 either way.")
@subnet_option
def export_cmd(target_dir: Path, draft_dir: Path, out: Path, kv_capacity: int, max_tree: int, taps: str,
               no_attn_scores: bool, precision: str, chain_steps: int, min_trt: str, skip_check: bool,
               dtype: str, subnet: str | None) -> None:
    """Export TARGET_DIR and its draft to a bundle: vision/target/draft ONNX graphs + manifest.

    Ends with `dream-export check` (parity against torch, TensorRT-readiness lint) unless --skip-check.
    """
    _need_torch()
    from dream_export.export.bundle import ExportOptions, export_bundle

    try:
        tap_layers = tuple(int(t.removeprefix("L")) for t in taps.split(",") if t and t != "final")
    except ValueError as e:
        raise click.BadParameter("--taps takes layer numbers, e.g. final,L3,L7") from e
    export_bundle(target_dir, draft_dir, out, ExportOptions(kv_capacity=kv_capacity, max_tree=max_tree,
                                                            taps=tap_layers, attn_scores=not no_attn_scores,
                                                            chain_steps=chain_steps, dtype=dtype, subnet=subnet),
                  log=click.echo)
    if precision == "fp16":
        from dream_export.export.fp16 import convert_bundle

        convert_bundle(out, log=click.echo)
    if not skip_check:
        _check(out, target_dir, subnet_draft_dir(out, draft_dir, subnet), min_trt)


def _parity_samples(data_path: Path | None) -> list:
    """(image, prompt) pairs for parity's realistic feeds and greedy agreement: the --data prompts, or
    rendered demo scenes (plain images with questions, meaningful to any VLM)."""
    from dream_export.export.parity import GREEDY_PROMPTS

    if data_path is None:
        from dream_export.demo.scenes import rendered_samples

        return rendered_samples(GREEDY_PROMPTS)
    from dream_export.core.prompts import read_prompts
    from dream_export.runtime.preprocess import load_image

    return [(load_image(r["image"]).convert("RGB"), r["prompt"]) for r in read_prompts(data_path)[:GREEDY_PROMPTS]]


def _check(bundle: Path, target_dir: Path | None, draft_dir: Path | None, min_trt: str,
           data_path: Path | None = None) -> None:
    from dream_export.errors import IncompatibleArtifactError
    from dream_export.export.parity import check_bundle
    from dream_export.export.trt_lint import lint_bundle
    from dream_export.runtime.bundle import Bundle

    Bundle.open(bundle, verify=True)  # every file's sha256 against the manifest, before any parity run
    click.echo(f"integrity: every file of {bundle} matches its recorded sha256")
    parity = check_bundle(bundle, target_dir, draft_dir, log=lambda _s: None, samples=_parity_samples(data_path))
    lint = lint_bundle(bundle, min_trt)
    for graph, variants in parity["graphs"].items():
        for var, res in variants.items():
            click.echo(f"parity {graph:<7}{var:<5} worst error {max(res['max_rel'].values()):.2e} of scale "
                       f"(tolerance {parity['tolerance'][var]:.0e}) {'ok' if res['ok'] else 'FAILED'}")
    for graph, rep in lint["graphs"].items():
        status = "ok" if rep["ok"] else f"{len(rep['errors'])} error(s)"
        click.echo(f"TensorRT >= {min_trt} lint {graph:<12} {status}, {len(rep['warnings'])} warning(s)")
    click.echo(f"wrote {bundle / 'reports' / 'parity.json'} and {bundle / 'reports' / 'trt_lint.json'}")
    problems = parity["failures"] + [f"{g}: {e['op']}: {e['message']}" for g, r in lint["graphs"].items()
                                     for e in r["errors"]]
    if problems:
        raise IncompatibleArtifactError("bundle check failed:\n  " + "\n  ".join(problems[:20]))


@cli.command("check")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", "target_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Source VLM (default: the path the manifest records).")
@click.option("--draft", "draft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--min-trt", default="8.5", show_default=True)
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL prompts (image, prompt) for the realistic feeds [rendered demo scenes].")
def check_cmd(bundle: Path, target_dir: Path | None, draft_dir: Path | None, min_trt: str,
              data_path: Path | None) -> None:
    """Parity of every graph (and precision variant) against torch, and the TensorRT-readiness lint."""
    _need_torch()
    _check(bundle, target_dir, draft_dir, min_trt, data_path)


def _sampling_options(f):
    for opt in reversed([
        click.option("--backend", default="onnxruntime", show_default=True,
                     type=click.Choice(["onnxruntime", "onnxruntime-cuda", "tensorrt"])),
        click.option("--mode", type=click.Choice(["tree", "chain", "ar"]), default=None,
                     help="Drafting mode [the shape `dream-export search` chose for the bundle, else tree]."),
        tree_option("--tree", "tree_spec", default=None,
                    help="K,DEPTH,TOTAL of the speculation tree [the searched shape, else 4,6,32; chains: the "
                         "bundle's chain depth]."),
        click.option("--max-new-tokens", default=128, show_default=True),
        click.option("--vtc-keep", type=float, default=None, help="Visual-token keep ratio for the draft."),
        vtc_score_option,
        click.option("--threads", default="2", show_default=True,
                     help="ONNX Runtime intra-op threads: a number, or per graph, e.g. target=2,draft=1."),
        click.option("--precision", default="fp32", show_default=True,
                     help="Graph variant: fp32, fp16 (export --precision fp16) or cpu (build --target cpu)."),
        click.option("--verify", is_flag=True,
                     help="Check every bundle file's sha256 before loading (sizes are always checked)."),
    ]):
        f = opt(f)
    return f


@cli.command("run")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--prompt", required=True)
@_sampling_options
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--timeout", type=float, default=None,
              help="Seconds: answer with the text so far (finish reason `timeout`) when decoding takes longer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (last line).")
def run_cmd(bundle: Path, image: Path, prompt: str, backend: str, mode: str, tree_spec: TreeSpec, max_new_tokens: int,
            vtc_keep: float | None, vtc_score: str, threads: str, precision: str, verify: bool, temperature: float,
            top_p: float, top_k: int, seed: int | None, timeout: float | None, as_json: bool) -> None:
    """Answer one (image, prompt) with the bundle, streaming text as rounds are accepted."""
    from dream_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=backend, threads=threads, precision=precision, verify=verify)
    pipe.engine.target.vtc_score = vtc_score
    stream = pipe.stream(image, prompt, max_new_tokens=max_new_tokens, mode=mode, tree=tree_spec,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, vtc_keep=vtc_keep,
                         deadline_s=timeout)
    for delta in stream:
        if not as_json:
            click.echo(delta, nl=False)
    res = stream.result
    if as_json:
        _emit_json({"text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason, "stats": res.stats})
    else:
        st = res.stats
        click.echo(f"\n[{res.finish_reason}] {st['tokens']} tokens, tau {st['tau']:.2f}, "
                   f"{st['tokens_per_s']:.1f} tok/s", err=True)


@cli.command("bench")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@_sampling_options
@click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--sweep", is_flag=True, help="Also try several tree shapes, then thread counts for the fastest shape.")
def bench_cmd(bundle: Path, data_path: Path, backend: str, mode: str, tree_spec: TreeSpec, max_new_tokens: int,
              vtc_keep: float | None, vtc_score: str, threads: str, precision: str, verify: bool, limit: int | None,
              json_out: Path | None, plot_out: Path | None, sweep: bool) -> None:
    """Speculative vs autoregressive decoding on the same backend: speedup, tau, time split."""
    from dream_export.core.prompts import read_prompts
    from dream_export.io import atomic_write_text
    from dream_export.runtime.bench import bench
    from dream_export.runtime.bench import sweep as sweep_shapes
    from dream_export.runtime.pipeline import Pipeline

    rows = read_prompts(data_path)[:limit]
    def load(th: str) -> Pipeline:
        p = Pipeline.load(bundle, backend=backend, threads=th, precision=precision, verify=verify)
        p.engine.target.vtc_score = vtc_score
        return p

    pipe = load(threads)
    summary = bench(pipe, rows, max_new_tokens, tree_spec, mode, vtc_keep)
    summary["settings"]["vtc_score"] = vtc_score
    if sweep:
        summary.update(sweep_shapes(pipe, rows, load, max_new_tokens, vtc_keep, log=click.echo))
    _print_bench(summary)
    if json_out:
        atomic_write_text(json_out, json.dumps(summary, indent=2))
    if plot_out:
        from dream_export.plots import bench_plot

        bench_plot(summary, plot_out)


def _print_bench(s: dict) -> None:
    click.echo(f"backend {s['backend']}, {s['settings']['prompts']} prompts, tree {s['settings']['tree']}")
    click.echo(f"  speedup (end to end) {s['speedup']:.2f}x   decode speedup {s['decode_speedup']:.2f}x")
    click.echo(f"  tau {s['tau']:.2f}   greedy match {s['match_rate'] * 100:.0f}%   host {s['host_fraction'] * 100:.1f}% "
               "of decode")
    click.echo(f"  tokens/s: speculative {s['spec_tokens_per_s']:.1f}, autoregressive {s['ar_tokens_per_s']:.1f}")
    split = s["time_split_seconds"]
    click.echo("  time split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of targets.")
def targets_cmd(as_json: bool) -> None:
    """Hardware targets: compute capability, memory, bandwidth, DLA cores, precisions, TensorRT stack."""
    from dream_export.targets.registry import all_targets

    rows = [t.to_dict() for t in all_targets()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'name':<28}{'sm':>5}{'mem GB':>8}{'GB/s':>8}{'DLA':>5}  {'TensorRT':<9}precisions")
    for r in rows:
        trt = r.get("tensorrt") or "-"
        num = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731  (the cpu target has no fixed figures)
        click.echo(f"{r['name']:<28}{r['sm'] or '-':>5}{num(r['memory_gb']):>8}{num(r['bandwidth_gbs']):>8}"
                   f"{r['dla_cores']:>5}  {trt:<9}{','.join(r['precisions'])}")


def _model_config(path: Path) -> tuple[dict, dict | None]:
    """(target config.json, draft_config.json or None) from a bundle, a model directory or a config file."""

    if (path / "manifest.json").exists():
        m = json.loads((path / "manifest.json").read_text())
        return source_configs(m, path)
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.exists():
        raise UsageError(f"{path}: expected a bundle, a model directory or a config.json")
    try:
        return json.loads(cfg.read_text()), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg} is not a JSON model config ({e})") from e


@cli.command("plan")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--target", "target_name", required=True,
              help="Target name (see `dream-export targets`), or 'all' for predicted tokens/s on every GPU target.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp16", show_default=True)
@click.option("--kv-capacity", type=int, default=None, help="Fix the KV capacity instead of searching.")
@click.option("--tree", "tree_size", type=int, default=None, help="Fix the tree size instead of searching.")
@click.option("--tau", type=float, default=None,
              help="Acceptance length for the predicted tokens/s (default: the DREAM paper's LLaVA-1.6-7B 5.51; "
                   "use your draft's from `dream-export bench`).")
@tree_option("--draft-tree", "draft_tree", help="K,DEPTH,TOTAL of the drafted tree for the predicted tokens/s.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(model: Path, target_name: str, precision: str, kv_capacity: int | None, tree_size: int | None,
             tau: float | None, draft_tree: TreeSpec, as_json: bool) -> None:
    """Memory plan of MODEL (bundle, model directory or config.json) on a target, with the latency model's
    predicted per-call times and tokens/s; refuses with numbers when the model does not fit."""
    from dream_export.targets.latency import Capacities, format_prediction, predict_target, target_peaks
    from dream_export.targets.latency_report import (
        DEFAULT_TAU,
        fit_tree,
        format_all_targets,
        predict_all_targets,
    )
    from dream_export.targets.memory import DraftDesc, describe_model, plan_memory
    from dream_export.targets.registry import get_target

    cfg, draft_cfg = _model_config(model)
    desc = describe_model(cfg, name=model.name)
    draft = DraftDesc.from_config(draft_cfg) if draft_cfg else None
    tree, tau = draft_tree, tau if tau is not None else DEFAULT_TAU
    # a bundle's graphs are exported with fixed buffers: predict for those, not for a re-plan
    caps = (Capacities.from_manifest(json.loads((model / "manifest.json").read_text()))
            if (model / "manifest.json").exists() else None)
    if target_name == "all":
        rows = predict_all_targets(desc, precision, tree, tau, draft, caps)
        if as_json:
            _emit_json({"model": desc.name, "tau": tau, "targets": rows})
        else:
            click.echo(format_all_targets(rows, desc.name, tau))
        return
    tgt = get_target(target_name)
    plan = plan_memory(desc, tgt, precision, draft=draft, kv_capacity=kv_capacity, tree_size=tree_size)
    caps = caps or Capacities.from_plan(plan.kv_capacity, plan.tree_size)
    if tgt.kind == "cpu":
        from dream_export.targets.measure import host_peaks

        peaks = host_peaks()
    else:
        peaks = target_peaks(tgt, precision)
    pred = predict_target(desc, caps, tgt, precision, fit_tree(tree, caps.max_tree), tau, draft, peaks)
    if as_json:
        _emit_json({**plan.to_dict(), "latency": pred})
    else:
        click.echo(plan.format())
        click.echo(format_prediction(pred))


@cli.command("build")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", "target_name", required=True)
@click.option("--precision", type=click.Choice(["fp16", "int8", "fp8"]), default="fp16", show_default=True,
              help="Engine precision (TensorRT targets); --target cpu optimizes the fp32 graphs. fp8 is refused: "
                   "nothing writes FP8 graphs yet.")
@click.option("--jetpack", type=click.Choice(["5.1", "6.0", "6.1", "6.2", "7.0"]), default=None,
              help="JetPack release of the Jetson (5.1: TensorRT 8.5, 6.0: 8.6, 6.1/6.2: 10.3); default: the "
                   "target's newest.")
@click.option("--dla", type=int, default=None, help="Run the vision engine on this DLA core (GPU fallback).")
@click.option("--workspace", type=int, default=None, help="Workspace pool in MB (default: the target's).")
@click.option("--timing-cache", default=None, help="Timing cache file, relative to the bundle.")
@click.option("--opt-level", type=int, default=None, help="TensorRT builder optimization level (0-5).")
@click.option("--max-prompt", type=int, default=None, help="Longest prompt the prefill profile must take.")
@click.option("--draft-weights", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True,
              help="--target cpu: the draft's linear weights (int8 drafts faster on CPUs; the target verifies "
                   "every token, so answers do not change).")
@click.option("--no-verify", is_flag=True, help="Skip recording verification feeds and the plan's coverage check.")
def build_cmd(bundle: Path, target_name: str, precision: str, jetpack: str | None, dla: int | None,
              workspace: int | None, timing_cache: str | None, opt_level: int | None, max_prompt: int | None,
              draft_weights: str, no_verify: bool) -> None:
    """Build the TensorRT engines here, or write engines/<target>/build.sh + build.json for the device.

    Engines are specific to GPU, TensorRT version and flags: when `tensorrt` imports and the local GPU
    has the target's SM, they are built here with the TensorRT Python API; otherwise the exact trtexec
    builds are written for the device (copy the bundle there and run the printed command). Either way
    engines/<target>/plan_check.json records the plan's checks: recorded runtime calls no profile covers,
    trtexec options the device's release does not know, files the plan names that the bundle lacks.
    """
    from dream_export.io import atomic_dir
    from dream_export.runtime.bundle import Bundle
    from dream_export.runtime.engine_meta import DeviceInfo
    from dream_export.targets.bundle_builds import bundle_builds
    from dream_export.targets.plan_check import check_build_plan, write_plan_check
    from dream_export.targets.plan_files import bind_to_bundle
    from dream_export.targets.registry import get_target
    from dream_export.targets.trt_build import build_engines, detect_build_path, local_target
    from dream_export.targets.trtexec import write_build_bundle

    b = Bundle.open(bundle)
    tgt = get_target(target_name, jetpack)
    if tgt.kind == "cpu":
        from dream_export.targets.cpu_build import build_cpu

        build_cpu(bundle, draft_int8=draft_weights == "int8", log=click.echo)
        click.echo(f"wrote {bundle / 'engines' / 'cpu'} (ONNX Runtime-optimized graphs, build.json); "
                   "use them with `--precision cpu` in run / bench")
        return
    options = dict(max_prompt=max_prompt, dla_core=dla, workspace_mb=workspace, timing_cache=timing_cache,
                   opt_level=opt_level)

    def plan(target):
        builds, notes = bind_to_bundle(bundle_builds(b.manifest, target, precision, **options), b.manifest, bundle,
                                       precision)
        for note in notes:
            click.echo(f"note: {note}")
        return builds

    builds = plan(tgt)  # validates the request on every host
    out = bundle / "engines" / tgt.name
    path = detect_build_path(tgt)
    click.echo(f"build path: {'TensorRT Python API on this host' if path.api else 'build.sh for the device'} "
               f"({path.reason})")
    if path.api:
        assert path.tensorrt is not None and path.gpu is not None
        here = local_target(tgt, path.tensorrt)
        device = DeviceInfo(path.tensorrt, path.gpu[1], path.gpu[0])
        local = plan(here)
        record = build_engines(local, bundle, here, device, out, log=click.echo)
        write_plan_check(out, check_build_plan(bundle, b.manifest, local, verify=None, coverage=not no_verify))
        click.echo(f"built {len(local)} engines ({precision}) into {out}, recorded in {record}; run them with "
                   "`--backend tensorrt`")
        return
    verify = None
    if not no_verify:
        from dream_export.targets.plan_check import record_verify_steps

        click.echo("recording verification feeds with ONNX Runtime...")
        verify = record_verify_steps(bundle, b.manifest, builds)
    # The plan (build.json, build.sh, plan_check.json) lands as one set: written into a temporary sibling
    # that replaces engines/<target> in one rename; engines already there are hard-linked across, not copied.
    with atomic_dir(out) as tmp:
        if out.is_dir():
            for f in out.iterdir():
                if f.name not in ("build.json", "build.sh", "plan_check.json") and f.is_file():
                    _link_or_copy(f, tmp / f.name)
        _, sh_tmp = write_build_bundle(tmp, builds, tgt, meta={"bundle_format": b.manifest["format_version"]},
                                       root="../..", verify=verify)
        check = write_plan_check(tmp, check_build_plan(bundle, b.manifest, builds, verify, coverage=not no_verify,
                                                       script=sh_tmp.read_text()))
    json_path, sh_path = out / "build.json", out / "build.sh"
    click.echo(f"wrote {sh_path} and {json_path} ({len(builds)} engines, {precision}, TensorRT "
               f"{'.'.join(map(str, tgt.trt_version))} on {tgt.display_name}"
               f"{', JetPack ' + tgt.jetpack if tgt.jetpack else ''})")
    click.echo(f"plan check: {json.dumps({k: check[k] for k in ('calls', 'uncovered', 'unknown_options', 'missing_files')})}")
    click.echo(f"copy {bundle} to the device and run `bash {bundle.name}/engines/{tgt.name}/build.sh` there")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same filesystem: no copy of multi-GB engines), else copy it."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@cli.command("profile")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Prompts to run (the profile covers real speculative rounds).")
@click.option("--component", type=click.Choice(["target", "draft", "vision", "all"]), default="all",
              show_default=True)
@click.option("--limit", default=5, show_default=True, help="Prompts to run.")
@click.option("--threads", default=2, show_default=True)
@click.option("--top", default=15, show_default=True, help="Rows per table.")
@tree_option("--tree", "tree_spec", help="K,DEPTH,TOTAL of the drafted tree.")
@click.option("--reps", default=5, show_default=True, help="Timed repetitions per call for predicted vs measured.")
@click.option("--json", "as_json", is_flag=True, help="Print the predicted-vs-measured summary as JSON (last line).")
def profile_cmd(bundle: Path, data_path: Path, component: str, limit: int, threads: int, top: int, tree_spec: TreeSpec,
                reps: int, as_json: bool) -> None:
    """Per-op profile of the bundle's graphs under speculative decoding (ONNX Runtime on this host), and the
    latency model's prediction for each graph call against its measured time.

    Writes reports/profile.json and reports/profile.png; prints the per-stage split of the runtime too.
    For TensorRT on the device, `build` writes the trtexec profiling commands; `dream_export.targets.profiles`
    parses their JSON into the same table shape.
    """
    import tempfile

    from dream_export.core.prompts import read_prompts
    from dream_export.io import atomic_write_text
    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.runtime.bundle import Bundle
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.targets.profiles import format_table, parse_ort_profile

    b = Bundle.open(bundle)
    tree = tree_spec
    rows = read_prompts(data_path)[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxRuntimeBackend(b, threads, profile_dir=Path(tmp))
        pipe = Pipeline(b, backend)
        stages: dict[str, float] = {}
        rounds: list[int] = []
        for row in rows:
            res = pipe.generate(row["image"], row["prompt"], tree=tree)
            rounds += res.stats["rounds"]
            for k, v in res.stats["seconds"].items():
                stages[k] = stages.get(k, 0.0) + v
        traces = backend.end_profiling()
        comps = ["target", "draft", "vision"] if component == "all" else [component]
        report = {"stages_seconds": stages, "components": {c: parse_ort_profile(traces[c]) for c in comps}}
    for c in comps:
        click.echo(f"\n{c} graph (ONNX Runtime, mean per call):\n{format_table(report['components'][c], top)}")
    click.echo("\nspeculative stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    prompt_tokens = max(1, round(sum(len(pipe.prompt_ids(r["prompt"], r["image"])) for r in rows) / len(rows)))
    tau = sum(rounds) / len(rounds) if rounds else 1.0
    cmp = _predicted_vs_measured(b, bundle, tree, min(max(tau, 1.0), tree.depth + 1), prompt_tokens, threads, reps)
    if cmp is not None:
        report["latency"] = cmp
        from dream_export.targets.latency_report import format_compare

        click.echo("\n" + format_compare(cmp))
    out = bundle / "reports"
    atomic_write_text(out / "profile.json", json.dumps(report, indent=2))
    try:
        from dream_export.plots import profile_plot

        profile_plot(report["components"], cmp, out / "profile.png")
        click.echo(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    except UsageError:  # no matplotlib: the JSON is the report
        click.echo(f"wrote {out / 'profile.json'} (install matplotlib for the plot)")
    if as_json:
        _emit_json({"latency": cmp, "stages_seconds": stages, "tau": tau})


def _predicted_vs_measured(b, bundle: Path, tree, tau: float, prompt_tokens: int, threads: int, reps: int):
    """The latency model on this host's measured peaks vs the same calls timed with ONNX Runtime (None when
    the bundle's source config is not on this machine)."""
    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.targets.latency import Capacities, decode_calls, predict_target
    from dream_export.targets.latency_report import compare, fit_tree
    from dream_export.targets.measure import host_peaks, measure_calls
    from dream_export.targets.memory import DraftDesc, describe_model
    from dream_export.targets.registry import get_target

    try:
        cfg, draft_cfg = _model_config(bundle)
    except UsageError as e:
        click.echo(f"\nno latency model: {e}")
        return None
    caps = Capacities.from_manifest(b.manifest)
    tree = fit_tree(tree, caps.max_tree)
    desc = describe_model(cfg, name=bundle.name)
    draft = DraftDesc.from_config(draft_cfg) if draft_cfg else None
    peaks = host_peaks(threads)
    pred = predict_target(desc, caps, get_target("cpu"), "fp32", tree, tau, draft, peaks, prompt_tokens)
    plain = OnnxRuntimeBackend(b, threads)  # a second set of sessions: the profiler's overhead stays out
    measured = measure_calls(plain, b.manifest, decode_calls(tree, tau, prompt_tokens), reps)
    return compare(pred, measured)


def _text_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir)).get_text_config()


from dream_export.calib.command import COMMANDS as _CALIB_COMMANDS  # noqa: E402

for _cmd in _CALIB_COMMANDS: cli.add_command(_cmd)  # noqa: E701
cli.add_command(search_cmd)

from dream_export.serve.command import COMMANDS as _SERVE_COMMANDS  # noqa: E402

for _cmd in _SERVE_COMMANDS: cli.add_command(_cmd)  # noqa: E701


def main() -> None:
    """Console-script entry point with the project's error policy."""
    report_errors(lambda: cli.main(standalone_mode=False), debug="--debug" in sys.argv)


def report_errors(fn, debug: bool = False) -> None:
    """Run `fn` under the project's error policy: an expected failure prints one line `error: ...` and
    exits 2; anything else is a bug (exit 1, the traceback only with `debug`)."""
    try:
        fn()
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # one line, like every expected failure: what was wrong (click names the option or path)
        click.echo(f"error: {e.format_message()}"
                   + (f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""), err=True)
        sys.exit(2)
    except DreamExportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the file system refused (disk full, permissions): no bug, and nothing was kept
        click.echo(f"error: {from_os_error(e)}", err=True)
        sys.exit(2)
    except Exception:
        if debug:
            raise
        import traceback

        click.echo("internal error (a bug in dream-export); rerun with --debug for the traceback:", err=True)
        click.echo(traceback.format_exc().strip().splitlines()[-1], err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
