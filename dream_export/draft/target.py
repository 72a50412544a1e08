"""Load a target VLM for drafting: its processor, explicit-KV decoder, embeddings and LM head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dream_export.draft.reference import TargetSide
from dream_export.errors import UsageError


@dataclass
class Target:
    """A loaded target VLM: the HF model and processor, plus the decoding view of it."""

    path: Path
    model: Any
    processor: Any
    side: TargetSide

    @property
    def eos_id(self) -> int:
        return self.processor.tokenizer.eos_token_id

    def prompt_embeds(self, image, prompt: str):
        """Merged prompt embeddings [1,n,H] and the image-token mask [n] for one (image, prompt)."""
        import torch

        from dream_export.core.prompts import PromptEncoder

        inputs = PromptEncoder(self.processor).encode([image], [prompt])
        with torch.no_grad():
            merged = self.model(**inputs, output_hidden_states=True).hidden_states[0]
        cfg = self.model.config
        img_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
        return merged, (inputs["input_ids"][0] == img_id).numpy()


def load_target(path: str | Path, taps: tuple[int, ...] = ()) -> Target:
    """Load a target checkpoint through `from_pretrained` (the path a user's checkpoint takes)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from dream_export.modeling.decoder import TargetDecoder

    path = Path(path)
    if not (path / "config.json").exists():
        raise UsageError(f"{path} is not a model directory (config.json missing)")
    AutoConfig.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    lm = model.model.language_model
    side = TargetSide(TargetDecoder(lm, taps=taps), lm.embed_tokens, model.lm_head)
    return Target(path, model, processor, side)
