"""Conversations → prompt token ids with the bundle's chat template (as transformers' processors render it).

A conversation is a list of messages, each `{"role": "system" | "user" | "assistant", "content": ...}`
where content is a string or a list of parts: `{"type": "text", "text": str}` or
`{"type": "image", "image": <PIL image | HxWxC uint8 array | path>}`. Images stay out of the template:
it sees `{"type": "image"}` placeholders (what HF templates test for), and each image placeholder it
renders (the image token, or Gemma3's <start_of_image>) is expanded to the text the family's processor
writes for that image (`runtime.image_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dream_export.errors import UsageError

ROLES = ("system", "user", "assistant")
# For checkpoints saved without a chat template: the image placeholder, then the text, as a base model
# would be prompted.
DEFAULT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% for p in m['content'] %}"
                    "{% if p['type'] == 'image' %}{{ image_token }}\n{% else %}{{ p['text'] }}{% endif %}"
                    "{% endfor %}{% endfor %}")
_PROBE = "\x00system-probe\x00"


class ContextLengthError(UsageError):
    """The prompt (plus the tokens asked for) does not fit the bundle's KV capacity."""


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a chat template (HF templates use it to refuse conversations)."""


def _raise(message: str):
    raise _TemplateRaised(message)


def normalize(messages: Sequence[dict]) -> tuple[list[dict], list[Any]]:
    """Validate a conversation; return it with content as part lists (images as placeholders) + the images."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UsageError("messages must be a non-empty list of {'role', 'content'} dicts")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError(f"message {i} needs a 'role' and a 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UsageError(f"message {i}: role {role!r} is not supported (use {', '.join(ROLES)})")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise UsageError(f"message {i}: content must be a string or a list of parts")
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image" and p.get("image") is not None:
                if role != "user":
                    raise UsageError(f"message {i}: only user messages may carry images")
                parts.append({"type": "image"})
                images.append(p["image"])
            else:
                raise UsageError(f"message {i}, part {j}: expected {{'type': 'text', 'text': str}} or "
                                 "{'type': 'image', 'image': <image>}")
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise UsageError("the last message must come from the user (the answer is the assistant's next turn)")
    first_other = next(i for i, m in enumerate(out) if m["role"] != "system")
    if any(m["role"] == "system" for m in out[first_other:]):
        raise UsageError("system messages must come before the conversation's first user/assistant turn")
    return out, images


class ChatTemplate:
    """The bundle's chat template, sandboxed, with the special tokens and image-token expansion it needs."""

    def __init__(self, source: str | None, bos_token: str, eos_token: str, image_token: str,
                 placeholder: str | None = None):
        """`placeholder`: what the template writes for an image when that is not `image_token` (Gemma3's
        <start_of_image>); `render` replaces each one with its image's text."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source or DEFAULT_TEMPLATE)
        self.tokens = {"bos_token": bos_token, "eos_token": eos_token, "image_token": image_token}
        self.image_token = image_token
        self.placeholder = placeholder or image_token
        # Many VLM templates (LLaVA's among them) drop system messages. The prompt is then folded into
        # the first user turn, as Mistral's and Gemma's own templates do, rather than silently lost.
        try:
            self.renders_system = _PROBE in self._render([
                {"role": "system", "content": [{"type": "text", "text": _PROBE}]},
                {"role": "user", "content": [{"type": "text", "text": "x"}]}])
        except Exception:
            self.renders_system = False

    def _render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **self.tokens)

    def render(self, messages: list[dict], image_texts: Sequence[str]) -> str:
        """Template text of a `normalize`d conversation, the k-th image placeholder replaced by
        `image_texts[k]` (what the family's processor expands an image to: its rows of image tokens, and
        marker tokens; `runtime.image_layout` is the one place that writes it)."""
        if not self.renders_system:
            messages = fold_system(messages)
        try:
            text = self._render(messages)
        except _TemplateRaised as e:
            raise UsageError(f"the bundle's chat template refused the conversation: {e}") from e
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(image_texts):
            raise UsageError(f"the chat template rendered {len(pieces) - 1} image placeholders for "
                             f"{len(image_texts)} image(s)")
        return "".join(p + t for p, t in zip(pieces, [*image_texts, ""], strict=True))


def fold_system(messages: list[dict]) -> list[dict]:
    """Leading system messages joined onto the first user turn's text (for templates without a system role)."""
    system = "\n\n".join(p["text"] for m in messages if m["role"] == "system" for p in m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    i = next(i for i, m in enumerate(rest) if m["role"] == "user")
    parts = list(rest[i]["content"])
    # the turn's first text part (its images, which templates put first, stay before it)
    k = next((j for j, p in enumerate(parts) if p["type"] == "text"), None)
    if k is None:
        parts.append({"type": "text", "text": system})
    else:
        parts[k] = {"type": "text", "text": f"{system}\n\n{parts[k]['text']}"}
    rest[i] = {"role": "user", "content": parts}
    return rest
