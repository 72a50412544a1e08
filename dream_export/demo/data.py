"""Demo prompt files: held-out, calibration and draft-training splits as images + JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from dream_export.demo import scenes

# Draft training and calibration prompts come from seed ranges disjoint from the VLM's own training
# stream start and from the held-out range.
DRAFT_SEED_BASE = 30_000_000


def write_split(out_dir: str | Path, name: str, samples: list[tuple[scenes.Scene, scenes.Sample]]) -> Path:
    """Render the images to `out_dir/images/` and write `out_dir/<name>.jsonl`; returns the JSONL path."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for scene, s in samples:
        img = img_dir / f"{name}-{s.seed}.png"
        if not img.exists():
            scenes.render(scene).save(img)
        lines.append(json.dumps({"image": f"images/{img.name}", "prompt": s.prompt, "task": s.task,
                                 "reference": s.answer}))
    path = out_dir / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def heldout_split(n_per_task: int) -> list[tuple[scenes.Scene, scenes.Sample]]:
    """The fixed held-out prompts (never trained on by the VLM or the draft), tasks interleaved so
    that any prefix of the file covers every task evenly."""
    data = scenes.heldout(n_per_task)
    k = len(scenes.TASKS)
    return [data[t * n_per_task + i] for i in range(n_per_task) for t in range(k)]


def train_split(n: int, base: int = DRAFT_SEED_BASE) -> list[tuple[scenes.Scene, scenes.Sample]]:
    """Prompts from the training distribution for draft training or calibration."""
    return [scenes.make_sample(base + i) for i in range(n)]
