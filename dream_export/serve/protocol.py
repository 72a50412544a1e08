"""The OpenAI chat-completions wire format: request models, their translation to a `Pipeline` conversation,
and the response, chunk and error bodies."""

from __future__ import annotations

import base64
import binascii
import io
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dream_export.errors import UsageError
from dream_export.runtime.pipeline import Result

# Who answered: Ray Serve spreads requests over replica processes, possibly on several machines.
REPLICA = f"{socket.gethostname()}/{os.getpid()}"
REPLICA_HEADER = "x-dream-export-replica"
# The runtime's "capacity" (KV cache full) is OpenAI's "length": the answer was cut, not finished.
FINISH = {"stop": "stop", "length": "length", "capacity": "length"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server has no use for


class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """POST /v1/chat/completions body (the fields this server honours; others are ignored)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Greedy unless asked: the answer then equals `dream-export run`'s, which robots usually want.
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def options(self) -> dict:
        """Pipeline options (less max_new_tokens, which depends on the prompt's length)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise UsageError("stop takes up to 4 non-empty strings")
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": stop}


def load_request_image(url: str, local_root: Path | None):
    """A data URL (or, when the server allows it, a file under `local_root`) → a decoded PIL image."""
    from dream_export.runtime.preprocess import load_image

    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise UsageError("image data URLs must be base64: data:image/png;base64,...")
        try:
            data = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise UsageError(f"image data URL is not valid base64 ({e})") from e
        source = "the image data URL"
    elif url.startswith("file://") or url.startswith("/"):
        if local_root is None:
            raise UsageError("local image files are off on this server (start it with --allow-local-images DIR); "
                             "send the image as a data URL")
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(local_root):
            raise UsageError(f"image {path} lies outside the allowed directory {local_root}")
        if not path.is_file():
            raise UsageError(f"image file {path} not found")
        data, source = path, str(path)
    else:
        raise UsageError("this server does not fetch remote images: send the image as a data URL "
                         "(data:image/png;base64,...)")
    # the runtime's own reader: size limits (no decompression bombs), every image mode handled as for `run`
    return load_image(data, name=source)


def data_url(image) -> str:
    """A PIL image or an image file as a PNG data URL (for clients: what the server accepts by default)."""
    from PIL import Image

    buf = io.BytesIO()
    with (Image.open(image) if isinstance(image, (str, Path)) else image.copy()) as im:
        im.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def conversation(req: ChatRequest, local_root: Path | None) -> list[dict]:
    """The request's messages as a `Pipeline.chat` conversation, images decoded."""
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role  # newer OpenAI clients say "developer"
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                 else {"type": "image", "image": load_request_image(p.image_url.url, local_root)} for p in m.content]
        out.append({"role": role, "content": parts})
    return out


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: Result) -> dict:
    prompt, completion = result.stats["prompt_tokens"], len(result.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def speculation(result: Result) -> dict:
    """Speculation statistics of one answer: acceptance length τ, speed, where the time went."""
    s = result.stats
    return {"tau": s["tau"], "rounds": len(s["rounds"]), "tokens_per_s": s["tokens_per_s"],
            "decode_tokens_per_s": s["decode_tokens_per_s"], "total_seconds": s["total_seconds"],
            "mode": s["mode"], "replica": REPLICA}


def completion(cid: str, model: str, result: Result) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": FINISH[result.finish_reason], "logprobs": None}],
            "usage": usage(result), "speculation": speculation(result)}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, result: Result | None = None) -> dict:
    """One server-sent event's body; the last one (with `result`) carries usage and speculation stats."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if result is not None:
        body["usage"], body["speculation"] = usage(result), speculation(result)
    return body


def error(message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
