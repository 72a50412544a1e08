"""How much of a target's answers depends on the image: the share of answer tokens whose greedy choice
changes when the image is swapped.

    python -m tools.image_dependence --target dream_export/assets/demo/vlm \
        --data out/demo-data/heldout.jsonl --limit 40 --json out/draft-table/image_dependence.json

For each prompt the target answers greedily with its own image; then the same prompt + answer is scored
(teacher forcing) with another held-out image of the same task, and each answer position counts as
image-dependent when the argmax differs. A draft without cross-attention can still predict every other
token from the text and the target's features, which bounds what cross-attention can add.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def measure(target_dir: Path, data: Path, limit: int) -> dict:
    """Per task and overall: prompts, answer tokens, image-dependent tokens and their share."""
    import torch
    from PIL import Image

    from dream_export.core.prompts import read_prompts
    from dream_export.draft.reference import generate
    from dream_export.draft.target import load_target
    from dream_export.modeling.decoder import causal_mask

    target = load_target(target_dir)
    side, dec = target.side, target.side.decoder
    rows = read_prompts(data)[:limit]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r.get("task", "all")].append(r)

    def argmaxes(image, prompt: str, answer: list[int]) -> torch.Tensor:
        emb, _ = target.prompt_embeds(image, prompt)
        full = torch.cat([emb, side.embed(answer[:-1])], 1) if len(answer) > 1 else emb
        t = full.shape[1]
        pk, pv = dec.empty_cache()
        with torch.no_grad():
            hidden = dec(full, torch.arange(t)[None], causal_mask(t), pk, pv)["hidden"][0]
            return side.logits(hidden[emb.shape[1] - 1:]).argmax(-1)

    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"prompts": 0, "tokens": 0, "image_dependent": 0})
    for task, group in by_task.items():
        for i, r in enumerate(group):
            other = group[(i + 1) % len(group)]
            if other is r:
                continue
            image = Image.open(r["image"]).convert("RGB")
            emb, _ = target.prompt_embeds(image, r["prompt"])
            answer = generate(side, emb, 128, mode="ar", eos_id=target.eos_id).tokens
            own = argmaxes(image, r["prompt"], answer)
            swapped = argmaxes(Image.open(other["image"]).convert("RGB"), r["prompt"], answer)
            c = counts[task]
            c["prompts"] += 1
            c["tokens"] += len(answer)
            c["image_dependent"] += int((own != swapped).sum())
    total = {k: sum(c[k] for c in counts.values()) for k in ("prompts", "tokens", "image_dependent")}
    out = {t: {**c, "share": c["image_dependent"] / max(c["tokens"], 1)} for t, c in sorted(counts.items())}
    out["all"] = {**total, "share": total["image_dependent"] / max(total["tokens"], 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    res = measure(a.target, a.data, a.limit)
    for task, c in res.items():
        print(f"{task:<10} {c['prompts']:>3} prompts {c['tokens']:>5} tokens  image-dependent {c['image_dependent']:>4} "
              f"({c['share'] * 100:.1f}%)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
