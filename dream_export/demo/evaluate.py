"""Held-out evaluation of the demo VLM: exact match of each answer's key clause, per task."""

from __future__ import annotations

from collections import defaultdict

from dream_export.core.prompts import PromptEncoder
from dream_export.demo import scenes


def generate_answers(model, processor, images: list, prompts: list[str], max_new_tokens: int = 128,
                     batch_size: int = 25) -> list[str]:
    """Greedy answers from the torch model (batched, left padded)."""
    import torch

    enc = PromptEncoder(processor)
    out = []
    for i in range(0, len(prompts), batch_size):
        inputs = enc.encode(images[i:i + batch_size], prompts[i:i + batch_size])
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def token_limit(task: str, key_only: bool = False) -> int:
    """New tokens to generate for a held-out answer: enough for its key clause when `key_only`.

    Counting answers state their verdict last, so even a key-only probe generates them in full.
    """
    return 24 if key_only and task != "count" else 128


def evaluate(model, processor, n_per_task: int = 100, tasks=scenes.TASKS, key_only: bool = False) -> dict:
    """Accuracy per task on the fixed held-out split.

    `accuracy[task]` is the share of answers whose key clause (the count, the colour, the number read)
    equals the reference exactly; `exact[task]` the share of whole answers equal to the reference.
    `key_only` stops generation early (training-time probes).
    """
    data = [(sc, s) for sc, s in scenes.heldout(n_per_task) if s.task in tasks]
    answers = []
    for task in dict.fromkeys(s.task for _, s in data):
        part = [(sc, s) for sc, s in data if s.task == task]
        answers += generate_answers(model, processor, [scenes.render(sc) for sc, _ in part],
                                    [s.prompt for _, s in part], max_new_tokens=token_limit(task, key_only))
    hit, full, n = defaultdict(int), defaultdict(int), defaultdict(int)
    for (_, s), a in zip(data, answers, strict=True):
        n[s.task] += 1
        hit[s.task] += scenes.answer_key(s.task, a) == s.key
        full[s.task] += a == s.answer
    res = {"accuracy": {t: hit[t] / n[t] for t in n}, "samples": dict(n)}
    if not key_only:
        res["exact"] = {t: full[t] / n[t] for t in n}
    return res
