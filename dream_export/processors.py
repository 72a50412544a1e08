"""Processors for checkpoints whose Hugging Face processor class needs torchvision.

Under transformers 5, `PixtralProcessor` (Mistral3 / Pixtral checkpoints) imports torchvision, whose
wheels here are CUDA builds that do not install beside the CPU torch. `PixtralPromptProcessor` does what
that processor does with the checkpoint's own tokenizer and (PIL) image processor: each `[IMG]` of the
text becomes the image's rows of `[IMG]` tokens, `[IMG_BREAK]` after each row and `[IMG_END]` last, the
image processor rounding sizes to whole merged patches (`patch_size × spatial_merge_size`), as
`PixtralProcessor` asks it to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PixtralPromptProcessor:
    """`PixtralProcessor`'s behaviour (call, chat template, save) without torchvision."""

    def __init__(self, tokenizer: Any, image_processor: Any, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template: str | None = None, image_token: str = "[IMG]", image_break_token: str = "[IMG_BREAK]",
                 image_end_token: str = "[IMG_END]"):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        # PixtralProcessor passes this patch size to its image processor on every call; setting it here
        # makes the image processor alone (what export reads its parameters from) resize the same way
        step = patch_size * spatial_merge_size
        image_processor.patch_size = {"height": step, "width": step}
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PixtralPromptProcessor:
        """Tokenizer, image processor, `processor_config.json` and chat template of a saved checkpoint."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        cfg_file = path / "processor_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        keys = ("patch_size", "spatial_merge_size", "image_token", "image_break_token", "image_end_token")
        return cls(AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path)),
                   chat_template=template, **{k: cfg[k] for k in keys if k in cfg})

    def image_text(self, image_size) -> str:
        """The placeholder text of an image of (height, width) pixels after preprocessing."""
        from dream_export.runtime.image_layout import pixtral_text

        step = self.patch_size * self.spatial_merge_size
        return pixtral_text(int(image_size[0]) // step, int(image_size[1]) // step, self.image_token,
                            self.image_break_token, self.image_end_token)

    def __call__(self, text=None, images=None, return_tensors: str | None = "pt", padding: bool = False, **kwargs):
        """Like `PixtralProcessor.__call__`: images (one, a list, or one list per text) in the order of the
        texts' `[IMG]` placeholders."""
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        flat = [im for group in images for im in (group if isinstance(group, (list, tuple)) else [group])] \
            if isinstance(images, (list, tuple)) else ([] if images is None else [images])
        data: dict = {}
        if flat:
            data.update(self.image_processor(images=flat, return_tensors=return_tensors))
            sizes = iter(data["image_sizes"].tolist())
            out = []
            for t in texts:
                pieces = t.split(self.image_token)
                out.append(pieces[0] + "".join(self.image_text(next(sizes)) + p for p in pieces[1:]))
            texts = out
        if texts:
            data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs) -> str:
        """The chat template rendered as text."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """The files `from_pretrained` (and, with torchvision, `PixtralProcessor`) reads back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        (path / "processor_config.json").write_text(json.dumps({
            "processor_class": "PixtralProcessor", "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size, "image_token": self.image_token,
            "image_break_token": self.image_break_token, "image_end_token": self.image_end_token}, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)
