"""Load a target VLM for drafting and export: its family adapter, processor, explicit-KV decoder,
embeddings and LM head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dream_export.draft.reference import TargetSide
from dream_export.errors import UsageError
from dream_export.families import VLM, load_processor, load_vlm, require_exportable
from dream_export.options import LOAD_DTYPES


@dataclass
class Target:
    """A loaded target VLM: the HF model seen through its family adapter, its processor, and the
    decoding view of it."""

    path: Path
    vlm: VLM
    processor: Any
    side: TargetSide

    @property
    def model(self) -> Any:
        """The HF *ForConditionalGeneration module."""
        return self.vlm.model

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends an answer (see `families.eos_ids`)."""
        from dream_export.families import eos_ids

        return eos_ids(self.model, self.processor.tokenizer)

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    def prompt_embeds(self, image, prompt: str):
        """Merged prompt embeddings [1,n,H] and the image-token mask [n] for one (image, prompt)."""
        import torch

        from dream_export.core.prompts import PromptEncoder

        inputs = dict(PromptEncoder(self.processor).encode([image], [prompt]))
        ids, pixels = inputs.pop("input_ids"), inputs.pop("pixel_values")
        with torch.no_grad():
            merged = self.vlm.merge(ids, pixels, **inputs)
        return merged, self.vlm.image_token_mask(ids)[0].cpu().numpy()


def load_target(path: str | Path, taps: tuple[int, ...] = (), dtype: Any = "float32") -> Target:
    """Load a target checkpoint through `from_pretrained` (the path a user's checkpoint takes) and its
    family adapter. `dtype`: a torch dtype or its name, or "auto" for the checkpoint's own dtype."""
    import torch

    path = Path(path)
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in LOAD_DTYPES:
            raise UsageError(f"cannot load weights as {dtype!r}: choose one of {', '.join(LOAD_DTYPES)}")
        dtype = getattr(torch, dtype)
    vlm = load_vlm(path, dtype=dtype)
    # the draft's features and the exported graphs come from TargetDecoder: refuse what it gets wrong
    require_exportable(vlm)
    processor = load_processor(path)
    side = TargetSide(vlm.decoder(taps), vlm.embed_tokens, vlm.lm_head,
                      softcap=vlm.facts.final_logit_softcapping)
    return Target(path, vlm, processor, side)
