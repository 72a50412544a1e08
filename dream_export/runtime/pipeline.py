"""The public runtime API: load a bundle once, answer (image, prompt) requests, optionally streamed.

    from dream_export.runtime import Pipeline
    pipe = Pipeline.load("out/demo/bundle")
    result = pipe.generate(image, "How many circles are there?")
    print(result.text, result.stats["tau"])
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.errors import UsageError
from dream_export.runtime.accept import SamplingParams
from dream_export.runtime.backends import Backend, make_backend
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.engine import EngineStats, SpecEngine
from dream_export.runtime.tree import TreeSpec

MODES = ("tree", "chain", "ar")
# For checkpoints saved without a chat template: the image placeholder, then the text, as a base model
# would be prompted.
DEFAULT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% for p in m['content'] %}"
                    "{% if p['type'] == 'image' %}{{ image_token }}\n{% else %}{{ p['text'] }}{% endif %}"
                    "{% endfor %}{% endfor %}")


@dataclass
class Result:
    """One answer: text, token ids, why it stopped, and speculation statistics."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


class Pipeline:
    """Bundle + backend + tokenizer + image preprocessing; thread-safe, reusable across requests."""

    def __init__(self, bundle: Bundle, backend: Backend):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        from dream_export.runtime.preprocess import ImagePreprocessor

        m = bundle.manifest
        self.bundle, self.backend = bundle, backend
        emb = m["embeddings"]
        table = load_file(str(bundle.root / emb["file"]))[emb["tensor"]].astype(np.float32)
        self.embed_table = table * np.float32(emb.get("scale", 1.0))
        self.tokenizer = Tokenizer.from_file(str(bundle.root / "tokenizer.json"))
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self.template = env.from_string(m.get("chat_template") or DEFAULT_TEMPLATE)
        self.preprocess = ImagePreprocessor.from_dict(m["preprocess"])
        tok = m["tokens"]
        self.image_token_id, self.eos_id = tok["image_token_id"], tok["eos_id"]
        self.image_token = self.tokenizer.id_to_token(self.image_token_id)
        self.bos_token = self.tokenizer.id_to_token(tok["bos_id"]) if tok.get("bos_id") is not None else ""
        self.eos_token = self.tokenizer.id_to_token(self.eos_id)
        self.n_image_tokens = tok["image_tokens_per_image"]
        self.engine = SpecEngine(bundle, backend, self.embed_table)
        self._lock = threading.Lock()
        self.precision = "fp32"

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", threads: int | str | dict[str, int] = 2,
             precision: str = "fp32") -> Pipeline:
        """Open a bundle directory with the named backend ('onnxruntime', 'onnxruntime-cuda', 'tensorrt'),
        CPU threads (a number, or per graph: "target=2,draft=1") and graph precision ('fp32', or a variant
        the bundle carries such as 'fp16')."""
        bundle = Bundle.open(path)
        pipe = cls(bundle, make_backend(backend, bundle, threads, precision))
        pipe.precision = precision
        return pipe

    # ---- request preparation -----------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-templated prompt with the image placeholder expanded to the image's token count."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token, image_token=self.image_token)
        text = text.replace(self.image_token, self.image_token * self.n_image_tokens)
        # the tokenizer's own special tokens (llava-hf: the BOS its template leaves out) as the HF
        # processor added them at export
        adds = bool(self.bundle.manifest["tokens"].get("add_special_tokens", False))
        return self.tokenizer.encode(text, add_special_tokens=adds).ids

    def prompt_embeds(self, image, prompt: str) -> tuple[np.ndarray, np.ndarray, float]:
        """Merged prompt embeddings [n,H], image-token mask [n] and the vision time in seconds."""
        if image is None:
            raise UsageError("an image is required (the bundle's prompts are image + text)")
        ids = np.array(self.prompt_ids(prompt), dtype=np.int64)
        t0 = time.perf_counter()
        pixels = self.preprocess(image)
        vb = self.bundle.graph("vision")["bindings"]
        feats = self.backend.run("vision", {vb["pixel_values"]: pixels})[vb["image_embeds"]][0]
        vision_s = time.perf_counter() - t0
        emb = self.embed_table[ids]
        mask = ids == self.image_token_id
        if mask.sum() != feats.shape[0]:
            raise UsageError(f"prompt has {int(mask.sum())} image tokens but the image gives {feats.shape[0]}")
        emb[mask] = feats
        return emb, mask, vision_s

    # ---- generation --------------------------------------------------------------------------
    def stream(self, image, prompt: str, max_new_tokens: int = 128, mode: str = "tree",
               tree: TreeSpec | str | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, vtc_keep: float | None = None, stop: list[str] | None = None,
               _result: Result | None = None, _deltas: bool = True) -> Iterator[str]:
        """Yield text deltas as rounds are accepted; the final `Result` lands in `_result` when given.

        `_deltas=False` (`generate`): without stop strings no text is needed before the end, so the
        answer is detokenized once instead of after every round.
        """
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(tree, str):
            try:
                tree = TreeSpec.parse(tree)
            except ValueError as e:
                raise UsageError(str(e)) from e
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        with self._lock:
            t0 = time.perf_counter()
            emb, mask, vision_s = self.prompt_embeds(image, prompt)
            self.backend.reset_stats()
            stats = EngineStats()
            tokens: list[int] = []
            text, finish = "", "capacity"
            t_dec = time.perf_counter()
            per_round = _deltas or bool(stop)  # text is needed every round only to stream it or find a stop

            def detok() -> str:
                return self.tokenizer.decode([t for t in tokens if t != self.eos_id])

            for rnd in self.engine.generate(emb, mask, max_new_tokens, mode, tree, sampling, self.eos_id, vtc_keep,
                                            stats):
                tokens += rnd.tokens
                if per_round:
                    new_text = detok()
                    hit = next((s for s in (stop or []) if s in new_text), None)
                    if hit is not None:
                        new_text = new_text[: new_text.index(hit)]
                    delta, text = new_text[len(text):], new_text
                    if delta:
                        yield delta
                    if hit is not None:
                        finish = "stop"
                        break
                if tokens and tokens[-1] == self.eos_id:
                    finish = "stop"
                    break
                if len(tokens) >= max_new_tokens:
                    finish = "length"
                    break
            if not per_round:
                text = detok()
            end = time.perf_counter()
            secs = dict(stats.seconds)
            secs["vision"] = vision_s
            decode_s = end - t_dec - secs["prefill"]
            # orchestration = decode wall time outside target/draft calls (tree building, masks, copies)
            decode_backend = sum(v for g, v in self.backend.seconds.items() if g != "vision") - secs["prefill"]
            n = len(tokens)
            result = Result(text.strip(), tokens, finish, {
                "tau": stats.tau, "rounds": stats.rounds, "seconds": secs, "total_seconds": end - t0,
                "decode_seconds": decode_s, "tokens": n, "tokens_per_s": n / max(end - t0, 1e-9),
                "decode_tokens_per_s": max(n - 1, 0) / max(decode_s, 1e-9),
                "host_seconds": max(decode_s - decode_backend, 0.0),
                "backend_seconds": dict(self.backend.seconds), "mode": mode})
            if _result is not None:
                _result.__dict__.update(result.__dict__)

    def generate(self, image, prompt: str, **kwargs) -> Result:
        """Answer one request (see `stream` for the options)."""
        res = Result("", [], "")
        for _ in self.stream(image, prompt, _result=res, _deltas=False, **kwargs):
            pass
        return res
