"""Turn (image, question[, answer]) into model inputs exactly as the saved processor does at inference."""

from __future__ import annotations

from typing import Any


class PromptEncoder:
    """Chat-template + processor wrapper shared by training, evaluation and the demo command."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def prompt_text(self, prompt: str) -> str:
        """The templated user turn, ending with the assistant cue the model answers after."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, images: list, prompts: list[str]) -> dict:
        """Batch of prompts (left padded, ready for `generate`)."""
        self.tokenizer.padding_side = "left"
        return self.processor(text=[self.prompt_text(p) for p in prompts], images=images,
                              return_tensors="pt", padding=True)

    def encode_train(self, image, prompt: str, answer: str) -> dict:
        """One supervised sequence: prompt ids, answer ids + EOS, labels masked to the answer."""
        enc = self.processor(text=self.prompt_text(prompt), images=image, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        answer_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        answer_ids.append(self.tokenizer.eos_token_id)
        return {"input_ids": prompt_ids + answer_ids,
                "labels": [-100] * len(prompt_ids) + answer_ids,
                "pixel_values": enc["pixel_values"][0]}
