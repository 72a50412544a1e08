"""Hardware-aware search over a DREAM-S supernet bundle's sub-networks (`dream-export search`).

Each candidate (query heads of the draft's last block × visual keep ratio × injected target layer ×
drafting shape) is run with the runtime on the prompts (greedy): that gives its acceptance length τ
and, per prompt, the prompt length, the draft's prompt length after compression, the answer length and
the rounds. The drafting shape is the verify budget: a chain of depth d (d draft steps, d + 1 nodes
verified) or an EAGLE-2 tree (K, DEPTH, TOTAL). It is the most hardware-dependent knob: τ grows with
depth and nodes, and a verify over N nodes costs the same as one over a single node only while it is
bandwidth- or launch-bound (below the target's ridge of FLOP/s over bytes/s at the precision's bytes per
weight); draft steps cost launches and the draft's weight bytes each. Its cost is
- on `cpu` (this machine): the measured ONNX Runtime wall time of every answer, against plain
  autoregressive decoding of the same prompt measured in the same pass;
- on any other target: the roofline latency model of that target (`targets.latency`) applied to the
  same requests: vision + prefill + the draft's prompt pass + rounds × (verify over the shape's nodes +
  the draft's context pass + (depth − 1) draft steps over K nodes), against vision + prefill + one
  decode step per token, with the candidate's pruned draft.
The objective is expected tokens/s. Successive halving fits the search into its budget. Its first rung
screens each axis at the other's default (every sub-network at the bundle's chain, the full network at
every shape); the best quarter of the sub-networks crossed with the best third of the shapes answer
more prompts, then the better half of those, and so on. The full draft at the bundle's chain is always
kept, so that the chosen configuration and the full one are compared on the same prompts in one run.
The Pareto front is over (τ ↑, a round's time in autoregressive steps ↓).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dream_export.errors import UsageError
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.subnet import SubNet, feature_columns, with_heads
from dream_export.runtime.tree import TreeSpec
from dream_export.runtime.vtc import vtc_kept_count


@dataclass
class Answer:
    """One prompt answered by one candidate (or by autoregressive decoding)."""

    prompt_tokens: int
    draft_prompt_tokens: int
    tokens: int
    rounds: int
    seconds: float  # measured wall time (cpu) or the latency model's time (other targets)
    round_seconds: float  # decode time per round
    split: dict[str, float] | None = None  # modelled costs: seconds of each part of the request


@dataclass
class Score:
    """A candidate's answers so far."""

    candidate: SubNet
    answers: dict[int, Answer] = field(default_factory=dict)  # prompt index → answer

    def over(self, prompts: list[int], ar: dict[int, Answer]) -> dict:
        """τ, tokens/s, speedup and cost per round over `prompts` (autoregressive times `ar`).

        `round_cost` is a round's time in autoregressive steps of the same prompts (measured beside it):
        free of the machine's pace, so candidates measured at different times compare on the front.
        """
        a = [self.answers[p] for p in prompts]
        tokens, rounds = sum(x.tokens for x in a), sum(x.rounds for x in a)
        secs = sum(x.seconds for x in a)
        round_s = sum(x.round_seconds * x.rounds for x in a) / max(rounds, 1)
        ar_step = sum(ar[p].round_seconds * ar[p].rounds for p in prompts) / max(sum(ar[p].rounds for p in prompts), 1)
        row = {"config": asdict(self.candidate), "label": self.candidate.label(), "prompts": len(a),
               "tau": tokens / max(rounds, 1), "tokens_per_s": tokens / secs,
               "speedup": sum(ar[p].seconds for p in prompts) / secs,
               "round_seconds": round_s, "round_cost": round_s / max(ar_step, 1e-12)}
        if a and all(x.split for x in a):  # where a request's time goes, seconds per prompt
            row["split"] = {k: sum(x.split[k] for x in a) / len(a) for k in a[0].split}
        return row


# Drafting shapes the search tries by default (those that fit the bundle's max_tree): chains of depth 3-16
# (CPUs pay per verified node), EAGLE-2 trees of 64 nodes at depths 8-16, and wider verify budgets up to
# 192 nodes, past a small GPU's ridge (Orin Nano: ~150 tokens at 1 byte a weight; H100: ~295).
SEARCH_SHAPES = ("1,3,4", "1,4,5", "1,5,6", "1,6,7", "1,7,8", "1,8,9", "1,10,11", "1,12,13", "1,16,17",
                 "4,6,32", "8,8,64", "8,12,64", "8,16,64", "8,10,128", "10,10,192")


def candidates(manifest: dict, tree: str | None = None) -> list[SubNet]:
    """Every sub-network a supernet bundle offers (drafting shape `tree`), in a fixed order."""
    sn = manifest.get("supernet")
    if not sn or sn.get("chosen") and not sn["variants"]:
        raise UsageError("search needs a supernet bundle with every head variant: export a `train-draft --supernet` "
                         "draft without --subnet")
    return [SubNet(h, k, lay, tree) for h in sn["head_choices"] for k in sn["vtc_keeps"] for lay in sn["layers"]]


def full_candidate(manifest: dict, tree: str | None = None) -> SubNet:
    sn = manifest["supernet"]
    return SubNet(sn["num_heads"], 1.0, sn["layers"][-1], tree)


def search_shapes(manifest: dict, default: str, shapes: list[str] | None = None) -> list[str]:
    """The drafting shapes to search: `shapes` (default: those of `SEARCH_SHAPES` within the bundle's
    max_tree), `default` first, as "K,DEPTH,TOTAL" (chains: "1,DEPTH,DEPTH+1")."""
    out = [default]
    for text in SEARCH_SHAPES if shapes is None else shapes:
        try:
            sh = TreeSpec.parse(text)
        except ValueError as e:
            raise UsageError(str(e)) from e
        text = f"{sh.k},{sh.depth},{sh.total}" if sh.k > 1 else f"1,{sh.depth},{sh.depth + 1}"
        fits = TreeSpec.parse(text).total <= manifest["max_tree"]
        if shapes is not None and not fits:
            raise UsageError(f"shape {text} verifies more nodes than the bundle's max_tree {manifest['max_tree']}; "
                             "re-export with a larger --max-tree")
        if fits and text not in out:
            out.append(text)
    return out


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (τ higher, round_cost lower), by τ descending."""
    front = [r for r in rows if not any(
        o["tau"] >= r["tau"] and o["round_cost"] <= r["round_cost"]
        and (o["tau"] > r["tau"] or o["round_cost"] < r["round_cost"]) for o in rows)]
    return sorted(front, key=lambda r: -r["tau"])


# ------------------------------------------------------------------------------------ cost models


class MeasuredCost:
    """The cpu target: ONNX Runtime wall time, as measured."""

    name = "measured (ONNX Runtime, this CPU)"

    def answer(self, res, cand: SubNet | None, draft_prompt: int) -> Answer:
        st = res.stats
        rounds = len(st["rounds"]) if cand else st["tokens"]
        decode = sum(st["seconds"].get(k, 0.0) for k in ("draft", "verify", "host"))
        return Answer(st["prompt_tokens"], draft_prompt, st["tokens"], rounds, st["total_seconds"],
                      decode / max(rounds, 1))


class ModelledCost:
    """Any GPU target: the roofline latency model of `targets.latency` on the answer's shape.

    `cost_as` (a Hugging Face VLM config): cost the answers as if the pair had that model's size (its
    default DREAM draft, the same share of heads pruned, its image-token count), keeping the measured τ
    and answer lengths: a forecast for a deployment the bundle stands in for.
    """

    def __init__(self, manifest: dict, bundle_dir: str | Path, target, precision: str, cost_as: dict | None = None):
        from dream_export.export.sources import source_configs
        from dream_export.targets.latency import Capacities, LatencyModel
        from dream_export.targets.memory import DraftDesc, describe_model, estimate

        sn = manifest["supernet"]
        self.image_tokens = manifest["tokens"]["image_tokens_per_image"]
        self.scaled_image_tokens = self.image_tokens
        if cost_as is not None:
            self.model = describe_model(cost_as)
            base = DraftDesc.from_model(self.model)
            if self.model.vision is not None:
                self.scaled_image_tokens = self.model.vision.lm_tokens
        else:
            cfg, draft_cfg = source_configs(manifest, bundle_dir)
            if draft_cfg is None:
                raise UsageError("the latency model needs the bundle's source draft_config.json, not on this machine")
            self.model = describe_model(cfg)
            base = DraftDesc.from_config({**draft_cfg, "last_block_heads": None})
        self.caps = Capacities.from_manifest(manifest)
        if cost_as is not None:  # the same room for text and answer as the bundle, the costed model's images
            self.caps = Capacities.from_plan(self.caps.kv_capacity - self.image_tokens + self.scaled_image_tokens,
                                             self.caps.max_tree)
        self.target, self.precision = target, precision
        plan = estimate(self.model, target, precision, self.caps.kv_capacity, self.caps.max_tree, base)
        if plan.headroom_bytes < 0:  # a forecast for a deployment that cannot load is no forecast
            raise UsageError(f"{self.model.name} at {precision} with KV capacity {self.caps.kv_capacity} and trees of "
                             f"{self.caps.max_tree} nodes needs {plan.device_bytes / 2**30:.1f} GiB on {target.name}, "
                             f"which has {plan.usable_bytes / 2**30:.1f} GiB usable (`dream-export plan` shows the "
                             "breakdown): cost a smaller model or choose a larger target")
        self.name = f"latency model ({target.name}, {precision}" + (f", costed as {self.model.name}" if cost_as else "") + ")"
        self._models = {}
        for h in sn["head_choices"]:
            heads = max(1, round(h / sn["num_heads"] * base.num_heads))  # the same share of the last block's heads
            self._models[h] = LatencyModel(self.model, self.caps, precision,
                                           DraftDesc(**{**asdict(base), "last_block_heads": heads}))
        self._cache: dict = {}

    def _scaled(self, prompt: int, keep: float) -> tuple[int, int]:
        """(prompt tokens, draft prompt tokens) with the modelled image-token count (one image)."""
        text = prompt - self.image_tokens
        return text + self.scaled_image_tokens, text + vtc_kept_count(self.scaled_image_tokens, keep)

    def _seconds(self, heads: int, call) -> float:
        key = (heads, call)
        if key not in self._cache:
            self._cache[key] = self._models[heads].predict(call, self.target).seconds
        return self._cache[key]

    def breakdown(self, heads: int, shape: TreeSpec, prompt: int, draft_prompt: int, tokens: int,
                  rounds: int) -> dict:
        """Seconds of one answer's calls drafting `shape` (mean context: the prompt plus half the answer)."""
        from dream_export.targets.latency import Call

        ctx = prompt + tokens // 2
        tau = max(1, round(tokens / max(rounds, 1)))
        fixed = self._seconds(heads, Call("vision", "vision")) + self._seconds(heads, Call("prefill", "target", prompt, 1))
        # the context pass drafts the first layer; each further layer is one draft call over ≤ K frontier nodes
        draft_step = self._seconds(heads, Call("draft step", "draft", shape.k, shape.k, shape.k, context=ctx))
        round_s = (self._seconds(heads, Call("verify", "target", shape.total, shape.total, context=ctx))
                   + self._seconds(heads, Call("draft ctx", "draft", tau, tau, tau, context=ctx))
                   + (shape.depth - 1) * draft_step)
        return {"fixed": fixed, "round": round_s,
                "draft_prompt": self._seconds(heads, Call("draft prompt", "draft", draft_prompt + 1, 1, prompt)),
                "decode": self._seconds(heads, Call("decode", "target", 1, 1, context=ctx))}

    def answer(self, res, cand: SubNet | None, draft_prompt: int) -> Answer:
        st = res.stats
        heads = cand.heads if cand else max(self._models)
        n = st["tokens"]
        rounds = len(st["rounds"]) if cand else n
        prompt = st["prompt_tokens"]
        if self.scaled_image_tokens != self.image_tokens and st["images"]:
            prompt, draft_prompt = self._scaled(prompt, cand.vtc_keep if cand else 1.0)
        b = self.breakdown(heads, cand.shape if cand else TreeSpec.chain(1), prompt, draft_prompt, n, rounds)
        if cand is None:
            return Answer(prompt, 0, n, n, b["fixed"] + n * b["decode"], b["decode"],
                          {"vision + prefill": b["fixed"], "draft prompt": 0.0, "decode": n * b["decode"]})
        secs = b["fixed"] + b["draft_prompt"] + rounds * b["round"]
        return Answer(prompt, draft_prompt, n, rounds, secs, b["round"] + b["draft_prompt"] / max(rounds, 1),
                      {"vision + prefill": b["fixed"], "draft prompt": b["draft_prompt"], "decode": rounds * b["round"]})

    def bounds(self, shapes: list[str], prompt: int = 64, keeps: tuple[float, ...] = (1.0,)) -> dict:
        """Which term bounds each graph call on the target (memory, compute or overhead), for the report:
        every call of the full network, the verify of every shape, the pruned drafts' steps and the draft's
        prompt pass at each visual keep ratio. `prompt`: tokens of a typical (costed) prompt, images included."""
        from dream_export.targets.latency import Call, decode_calls

        full = max(self._models)
        ctx = prompt + 64  # mid-answer
        calls: dict[str, tuple[int, Call]] = {}
        for h in sorted(self._models):
            for c in decode_calls(TreeSpec.chain(2), 4.0, prompt, ctx):
                if c.graph == "vision" and self.model.vision is None or c.graph != "draft" and h != full:
                    continue
                calls[c.label + (f" h{h}" if c.graph == "draft" else "")] = (h, c)
        img = self.scaled_image_tokens if self.model.vision is not None else 0
        for keep in sorted(set(keeps), reverse=True):
            n = prompt - img + vtc_kept_count(img, keep)
            calls[f"draft prompt pass ({n} tok, keep {keep:g})"] = (full, Call("draft prompt", "draft", n + 1, 1, prompt))
        for text in shapes:
            sh = TreeSpec.parse(text)
            calls[f"target verify ({sh.total} tok)"] = (full, Call("verify", "target", sh.total, sh.total, context=ctx))
            calls[f"draft step ({sh.k} tok) h{full}"] = (full, Call("step", "draft", sh.k, sh.k, sh.k, context=ctx))
        out = {}
        for label, (h, c) in calls.items():
            p = self._models[h].predict(c, self.target)
            out[label] = {"seconds": p.seconds, "bound": p.bound, "memory_s": p.memory_s, "compute_s": p.compute_s,
                          "overhead_s": p.overhead_s}
        return out


# ------------------------------------------------------------------------------------ the search


def cost_model(manifest: dict, bundle_dir: str | Path, target, precision: str | None = None,
               cost_as: dict | None = None) -> MeasuredCost | ModelledCost:
    """How the search costs answers on `target`: measured on this CPU, else its latency model (fp16 unless
    `precision`); raises `UsageError` for a forecast the target cannot load."""
    if target.kind == "cpu":
        if cost_as is not None:
            raise UsageError("--cost-as forecasts with a latency model: choose a GPU target (cpu is measured)")
        return MeasuredCost()
    return ModelledCost(manifest, bundle_dir, target,
                        precision or ("fp16" if "fp16" in target.precisions else target.precisions[0]), cost_as)


def search(bundle_dir: str | Path, target_name: str, rows: list[dict], seed: int = 0, budget_s: float = 1200.0,
           first_rung: int = 2, max_prompts: int = 16, max_new_tokens: int = 128, threads: int | str = 1,
           precision: str | None = None, cost_as: dict | None = None, shapes: list[str] | None = None,
           runs: dict | None = None, progress: bool = True, log=print) -> dict:
    """Search the supernet bundle's configurations for `target_name`; returns the report (see module doc).

    Rung 0 gives every sub-network at the bundle's chain, and the full network at every shape of
    `search_shapes(shapes)`, `first_rung` prompts; rung 1 crosses the best quarter of those sub-networks
    with the best third of the shapes; rung r ≥ 1 gives each survivor `first_rung · 2^r` prompts in all
    (at most `max_prompts`), then keeps the better half by expected tokens/s (the full draft at the
    bundle's chain always stays). A rung that would not fit the remaining `budget_s` is not started.
    `cost_as`: see `ModelledCost` (GPU targets only). `runs`: a dict that keeps the runtime's answers
    across searches of one bundle with modelled costs (τ and answer shapes do not depend on the target;
    measured costs never reuse an answer).
    """
    from tqdm import tqdm

    from dream_export.runtime.backends import make_backend
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.preprocess import load_image
    from dream_export.targets.registry import get_target

    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    target = get_target(target_name)
    if not rows:
        raise UsageError("search needs prompts (--data)")
    cost = cost_model(m, bundle_dir, target, precision, cost_as)  # before any session: a bad forecast fails at once
    order = list(range(len(rows)))
    rng = random.Random(seed)
    rng.shuffle(order)
    order = order[:max_prompts]
    pipes = {}
    for h in sorted({c.heads for c in candidates(m)}):
        view = with_heads(bundle, h)
        pipes[h] = Pipeline(view, make_backend("onnxruntime", view, threads, "fp32"))
    depth = pipes[max(pipes)].engine.chain_depth
    default = f"1,{depth},{depth + 1}"  # the bundle's chain: what the sub-networks are screened with
    shape_list = search_shapes(m, default, shapes)
    subs = candidates(m, default)
    full = full_candidate(m, default)
    screen = subs + [full_candidate(m, sh) for sh in shape_list if sh != default]
    images = {}

    def image(p: int):
        if p not in images:
            images[p] = load_image(rows[p]["image"]).convert("RGB")
        return images[p]

    ar: dict[int, Answer] = {}
    ref_tokens: dict[int, list[int]] = {}
    scores: dict[SubNet, Score] = {}
    lossless = True

    reuse = runs if isinstance(cost, ModelledCost) and runs is not None else {}

    def generate(c: SubNet | None, p: int):
        key = (c, rows[p]["image"], rows[p]["prompt"], max_new_tokens)
        if key in reuse:
            return reuse[key]
        pipe = pipes[c.heads if c else full.heads]
        if c is None:
            res = pipe.generate(image(p), rows[p]["prompt"], max_new_tokens=max_new_tokens, mode="ar")
        else:
            pipe.engine.target.feature_columns = feature_columns(m, c.layer)
            res = pipe.generate(image(p), rows[p]["prompt"], max_new_tokens=max_new_tokens, mode=c.mode,
                                tree=c.shape, vtc_keep=c.vtc_keep if c.vtc_keep < 1.0 else None)
        if isinstance(cost, ModelledCost) and runs is not None:
            reuse[key] = res
        return res

    def run_prompt(p: int, todo: list[SubNet], bar, into: dict, ar_into: dict) -> None:
        nonlocal lossless
        if p not in ar_into:  # one AR reference per prompt and pass (rows measured together compare)
            ref = generate(None, p)
            ar_into[p], ref_tokens[p] = cost.answer(ref, None, 0), ref.tokens
        for c in sorted(todo, key=lambda _c: rng.random()):  # a machine's drifting pace spreads over all
            if p in into.setdefault(c, Score(c)).answers:
                continue
            res = generate(c, p)
            lossless &= res.tokens == ref_tokens[p]
            into[c].answers[p] = cost.answer(res, c, _draft_prompt(res.stats, pipes[c.heads].n_image_tokens, c.vtc_keep))
            bar.update(1)

    survivors, rungs, done = list(screen), [], 0
    per_eval = None
    bar = tqdm(desc=f"search ({target.name})", disable=not progress, mininterval=2,
               total=_planned_evals(len(subs), len(shape_list), first_rung, len(order)))
    while True:
        n = min(len(order), first_rung * 2 ** len(rungs))
        new = order[:n]
        todo = sum(p not in scores.get(c, Score(c)).answers for c in survivors for p in new)
        if per_eval is not None and per_eval * todo > budget_s - (time.perf_counter() - t0):
            log(f"budget: rung {len(rungs)} ({len(survivors)} candidates × {n} prompts) would not fit; stopping")
            break
        t_rung = time.perf_counter()
        for p in new:
            run_prompt(p, survivors, bar, scores, ar)
        per_eval = (time.perf_counter() - t_rung) / max(todo, 1)
        done = n
        ranked = sorted((scores[c].over(order[:done], ar) for c in survivors), key=lambda r: -r["tokens_per_s"])
        rungs.append({"prompts": done, "candidates": len(survivors), "best": ranked[0]["label"],
                      "seconds": round(time.perf_counter() - t_rung, 1)})
        if done >= len(order) or len(survivors) <= 2:
            break
        if len(rungs) == 1:  # the screen: cross the best sub-networks with the best shapes
            by_sub = [SubNet(**{**r["config"], "tree": None}) for r in ranked if r["config"]["tree"] == default]
            by_shape = [r["config"]["tree"] for r in ranked
                        if SubNet(**{**r["config"], "tree": default}) == full]
            top_subs = by_sub[: max(2, math.ceil(len(by_sub) / 4))]
            top_shapes = by_shape[: max(2, math.ceil(len(by_shape) / 3))] if len(by_shape) > 1 else by_shape
            survivors = [SubNet(sb.heads, sb.vtc_keep, sb.layer, sh) for sh in top_shapes for sb in top_subs]
            survivors += [full] if full not in survivors else []
            continue
        keep = {SubNet(**r["config"]) for r in ranked[: max(2, len(ranked) // 2)]}
        survivors = [c for c in survivors if c in keep or c == full]
    bar.close()
    # every candidate at its most-measured fidelity
    rows_all = [scores[c].over(sorted(scores[c].answers, key=order.index), ar) for c in scores if scores[c].answers]
    finalists = sorted((scores[c].over(order[:done], ar) for c in survivors), key=lambda r: -r["tokens_per_s"])
    # the choice: the halving's best against the full draft, both answering the same prompts again beside
    # a fresh autoregressive reference, interleaved (measured costs; modelled costs are deterministic)
    best = SubNet(**finalists[0]["config"])
    final, final_ar = scores, ar
    if isinstance(cost, MeasuredCost) and best != full:
        final, final_ar = {}, {}
        bar = tqdm(desc="confirm", disable=not progress, mininterval=2, total=2 * done)
        for p in order[:done]:
            run_prompt(p, [best, full], bar, final, final_ar)
        bar.close()
    head_to_head = sorted((final[c].over(order[:done], final_ar) for c in {best, full}),
                          key=lambda r: -r["tokens_per_s"])
    chosen = {**head_to_head[0], "subnet": SubNet(**head_to_head[0]["config"]).as_option()}  # `export --subnet`
    full_row = next(r for r in head_to_head if SubNet(**r["config"]) == full)
    result = {
        "target": target.name, "cost": cost.name, "seed": seed, "budget_s": budget_s, "shapes": shape_list,
        "chosen": chosen, "full": full_row, "finalists": finalists, "head_to_head": head_to_head,
        "front": pareto_front(rows_all), "all": sorted(rows_all, key=lambda r: -r["tokens_per_s"]),
        "rungs": rungs, "prompts": [rows[p].get("prompt") for p in order[:done]], "lossless": lossless,
        "ar_tokens_per_s": sum(final_ar[p].tokens for p in order[:done]) / sum(final_ar[p].seconds
                                                                               for p in order[:done]),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if isinstance(cost, ModelledCost):
        prompt = round(sum(final_ar[p].prompt_tokens for p in order[:done]) / max(done, 1))
        result["bounds"] = cost.bounds(shape_list, prompt, tuple(m["supernet"]["vtc_keeps"]))
    return result


def _planned_evals(n_subs: int, n_shapes: int, first: int, n_prompts: int) -> int:
    """SubNet answers successive halving plans (for the progress bar; a budget stop ends it early)."""
    alive = n_subs + n_shapes - 1
    total, done, r = min(first, n_prompts) * alive, min(first, n_prompts), 1
    alive = max(2, math.ceil(n_subs / 4)) * (max(2, math.ceil(n_shapes / 3)) if n_shapes > 1 else 1) + 1
    while done < n_prompts:
        n = min(n_prompts, first * 2 ** r)
        total += (n - done) * alive + done * alive // 2  # crossed candidates answer the earlier prompts too
        done, alive, r = n, max(2, alive // 2), r + 1
    return total


def _draft_prompt(stats: dict, image_tokens: int, keep: float) -> int:
    """Tokens of the draft's prompt stream under visual keep ratio `keep` (what its first pass reads)."""
    n_img = image_tokens * stats["images"]
    return stats["prompt_tokens"] - n_img + vtc_kept_count(n_img, keep)


def write_choice(bundle_dir: str | Path, result: dict) -> None:
    """Record the chosen configuration in the bundle's manifest (atomically): the runtime applies it."""
    from dream_export.io import atomic_write_text

    path = Path(bundle_dir) / "manifest.json"
    m = json.loads(path.read_text())
    m["supernet"]["chosen"] = result["chosen"]["config"]
    m["supernet"]["search"] = {"target": result["target"], "cost": result["cost"], "seed": result["seed"],
                               "speedup": result["chosen"]["speedup"], "full_speedup": result["full"]["speedup"],
                               "prompts": result["chosen"]["prompts"]}
    atomic_write_text(path, json.dumps(m, indent=2))
