"""Train the demo VLM from scratch on procedurally generated scenes (CPU friendly, reproducible)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dream_export.core.prompts import PromptEncoder
from dream_export.demo import scenes
from dream_export.demo.evaluate import evaluate
from dream_export.demo.model import build_model, build_processor, train_tokenizer
from dream_export.io import atomic_dir, warmup_cosine


@dataclass
class TrainConfig:
    """Settings of one demo-VLM training run; all of them land in training.json."""

    steps: int = 3600
    batch_size: int = 20
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    eval_every: int = 500
    eval_per_task: int = 20
    # Short, image-grounded answers first: the visual binding is learned before long descriptions.
    curriculum_steps: int = 500
    # Auxiliary losses on the projected image tokens (heads discarded after training): per-cell
    # attributes on the patch tokens and object counts on the CLS token. The vision tower then encodes
    # shape, colour, size, digit and counts within the first few hundred steps, leaving the decoder only
    # the routing from question words to the right image token to learn.
    aux_weight: float = 0.5
    micro_batches: int = 3
    tokenizer_corpus: int = 20000


def _task_weights(step: int, cfg: TrainConfig) -> list[float]:
    # order: describe, count, color, position, read
    if step < cfg.curriculum_steps:
        return [0.5, 4, 3, 2, 1.5]
    return [2, 4, 3, 2, 1.5]


def cell_targets(scene: scenes.Scene) -> list[list[int]]:
    """Per grid cell (patch order): [kind, colour, size, digit] class ids, 0 meaning "none"."""
    kinds = ("none", *scenes.SHAPES, "number")
    colors = ("none", *scenes.COLORS)
    rows = [[0, 0, 0, 0] for _ in range(scenes.GRID * scenes.GRID)]
    for o in scene.objects:
        rows[o.cell] = [kinds.index(o.kind), colors.index(o.color),
                        0 if o.kind == "number" else 1 + scenes.SIZES.index(o.size),
                        0 if o.digit is None else 1 + o.digit]
    return rows


AUX_CLASSES = (len(scenes.SHAPES) + 2, len(scenes.COLORS) + 1, len(scenes.SIZES) + 1, 11)
# Counts read from the vision tower's CLS token: all objects, per shape, per colour (shapes only).
COUNT_HEADS = 1 + len(scenes.SHAPES) + len(scenes.COLORS)
MAX_COUNT = scenes.GRID * scenes.GRID + 1


def count_targets(scene: scenes.Scene) -> list[int]:
    """[total, per-shape..., per-colour...] object counts of a scene."""
    shapes = scene.shapes
    return ([len(scene.objects)] + [sum(o.kind == k for o in shapes) for k in scenes.SHAPES]
            + [sum(o.color == c for o in shapes) for c in scenes.COLORS])


def _chunks(items: list, n: int) -> list[list]:
    """`items` cut into `n` consecutive runs of near-equal size."""
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def train_demo_vlm(out_dir: str | Path, cfg: TrainConfig, log=print) -> dict:
    """Train the demo VLM and save it (fp16 weights, tokenizer, processor, training.json) to `out_dir`.

    The directory is written atomically: an interrupted run leaves any previous model in place.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    tokenizer = train_tokenizer(scenes.corpus_text(cfg.tokenizer_corpus, seed_base=5_000_000))
    processor = build_processor(tokenizer)
    encoder = PromptEncoder(processor)
    model = build_model(tokenizer, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"demo VLM: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")

    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(AUX_CLASSES))
    count_head = torch.nn.Linear(model.config.text_config.hidden_size, COUNT_HEADS * MAX_COUNT)
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, o: captured.__setitem__("img", o))
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux_head.named_parameters()] + [
        ("count." + n, p) for n, p in count_head.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    history = []
    seed_counter = 0
    pad = tokenizer.pad_token_id
    try:
        from tqdm import tqdm
        bar = tqdm(range(cfg.steps), desc="train demo VLM", mininterval=5)
    except ImportError:  # tqdm is a base dependency; this only guards odd environments
        bar = range(cfg.steps)
    for step in bar:
        model.train()
        batch, cells, counts = [], [], []
        weights = _task_weights(step, cfg)
        for _ in range(cfg.batch_size):
            task = rng.choices(scenes.TASKS, weights=weights)[0]
            scene, sample = scenes.make_sample(seed_counter, task)
            seed_counter += 1
            batch.append(encoder.encode_train(scenes.render(scene), sample.prompt, sample.answer))
            cells.append(cell_targets(scene))
            counts.append(count_targets(scene))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        # Counting answers are 3-5x longer than the rest: length-sorted micro-batches cut the padding,
        # and losses summed over tokens / samples keep the gradient that of the whole batch.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["input_ids"]))
        n_tokens = sum(sum(t != -100 for t in b["labels"][1:]) for b in batch)
        loss_value = 0.0
        for chunk in _chunks(order, cfg.micro_batches):
            part = [batch[i] for i in chunk]
            max_len = max(len(b["input_ids"]) for b in part)
            ids = torch.full((len(part), max_len), pad, dtype=torch.long)
            labels = torch.full((len(part), max_len), -100, dtype=torch.long)
            attn = torch.zeros((len(part), max_len), dtype=torch.long)
            for i, b in enumerate(part):
                n = len(b["input_ids"])
                ids[i, :n] = torch.tensor(b["input_ids"])
                labels[i, :n] = torch.tensor(b["labels"])
                attn[i, :n] = 1
            pixels = torch.stack([b["pixel_values"] for b in part])
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=attn).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tokens
            if cfg.aux_weight:
                img = captured["img"]  # [B, 1 + cells, H]: CLS first (the "full" feature strategy)
                aux_logits = aux_head(img[:, 1:]).split(AUX_CLASSES, -1)
                tgt = torch.tensor([cells[i] for i in chunk])  # [B, cells, 4]
                aux = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt[..., j].reshape(-1))
                          for j, lg in enumerate(aux_logits))
                cnt = count_head(img[:, 0]).view(-1, COUNT_HEADS, MAX_COUNT)
                aux = aux + F.cross_entropy(cnt.reshape(-1, MAX_COUNT),
                                            torch.tensor([counts[i] for i in chunk]).reshape(-1))
                loss = loss + cfg.aux_weight * aux * len(chunk) / len(batch)
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        opt.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{_lr_at(step, cfg):.1e}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            acc = evaluate(model, processor, n_per_task=cfg.eval_per_task, tasks=("count", "color", "read"),
                           key_only=True)
            rec = {"step": step + 1, "loss": round(loss_value, 4), "minutes": round((time.time() - t_start) / 60, 2),
                   "accuracy": {k: round(v, 3) for k, v in acc["accuracy"].items()}}
            history.append(rec)
            log(json.dumps(rec))

    model.eval()
    minutes = (time.time() - t_start) / 60
    final = evaluate(model.half().float(), processor, n_per_task=100)
    record = {"config": asdict(cfg), "parameters": n_params, "train_minutes": round(minutes, 1),
              "history": history, "heldout": final, "torch_version": torch.__version__}
    with atomic_dir(out_dir) as tmp:
        model.half().save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (Path(tmp) / "training.json").write_text(json.dumps(record, indent=2))
    log(f"saved demo VLM to {out_dir} after {minutes:.1f} min; held-out accuracy {final['accuracy']}")
    return record
