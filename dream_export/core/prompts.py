"""Prompts: the JSONL prompt files every command reads, and (image, question[, answer]) → model inputs
exactly as the saved processor does at inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dream_export.errors import UsageError


def read_prompts(path: str | Path) -> list[dict]:
    """JSONL rows {"image": path, "prompt": text, ...}; image paths relative to the file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if "image" not in row or "prompt" not in row:
            raise UsageError(f'{path}:{n}: each line needs "image" and "prompt"')
        img = Path(row["image"])
        row["image"] = str(img if img.is_absolute() else path.parent / img)
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no prompts")
    return rows


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether tokenizing a rendered prompt should let the tokenizer add its special tokens: not when the
    chat template wrote the BOS itself (Gemma3's does, and its tokenizer adds one too). HF processors'
    `apply_chat_template` applies this rule; a prompt tokenized with both would start with two BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


class PromptEncoder:
    """Chat-template + processor wrapper shared by draft training data, evaluation and the demo."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def prompt_text(self, prompt: str) -> str:
        """The templated user turn, ending with the assistant cue the model answers after (a processor
        without a chat template gets the image token, a newline and the prompt)."""
        if not getattr(self.processor, "chat_template", None):
            return f"{getattr(self.processor, 'image_token', None) or '<image>'}\n{prompt}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, images: list, prompts: list[str]) -> dict:
        """Batch of prompts (left padded, ready for `generate`)."""
        self.tokenizer.padding_side = "left"
        texts = [self.prompt_text(p) for p in prompts]
        # one list of images per prompt: processors that accept several images per prompt (Gemma3)
        # read a flat list as one prompt with all of them
        return self.processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                              add_special_tokens=adds_special_tokens(self.tokenizer, texts[0]))

    def encode_train(self, image, prompt: str, answer: str) -> dict:
        """One supervised sequence: prompt ids, answer ids + EOS, labels masked to the answer."""
        text = self.prompt_text(prompt)
        enc = self.processor(text=text, images=image, return_tensors="pt",
                             add_special_tokens=adds_special_tokens(self.tokenizer, text))
        prompt_ids = enc["input_ids"][0].tolist()
        answer_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        answer_ids.append(self.tokenizer.eos_token_id)
        return {"input_ids": prompt_ids + answer_ids,
                "labels": [-100] * len(prompt_ids) + answer_ids,
                "pixel_values": enc["pixel_values"][0]}
