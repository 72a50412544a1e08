"""The public runtime API: load a bundle once, answer requests or conversations, optionally streamed.

    from dream_export.runtime import Pipeline
    pipe = Pipeline.load("out/demo/bundle")
    result = pipe.generate(image, "How many circles are there?")
    print(result.text, result.stats["tau"])

    answer = pipe.chat([{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "Describe the scene."}]}])
    stream = pipe.stream(image, "Describe the scene.")
    for delta in stream:
        print(delta, end="")
    print(stream.result.stats["tau"])
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.errors import UsageError
from dream_export.runtime.accept import SamplingParams
from dream_export.runtime.backends import Backend, make_backend
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.chat import ChatTemplate, ContextLengthError, normalize
from dream_export.runtime.drafting import Drafter
from dream_export.runtime.engine import EngineStats, SpecEngine
from dream_export.runtime.positions import mrope_positions
from dream_export.runtime.subnet import apply_choice
from dream_export.runtime.tree import TreeSpec

MODES = ("tree", "chain", "ar")
# Streamed text holds back a trailing run of whitespace (the answer is stripped at the end) and of U+FFFD
# (an incomplete UTF-8 sequence the next token may complete), so deltas join to exactly `Result.text`.
_UNSETTLED = re.compile(r"[\s\ufffd]+$")


@dataclass
class Result:
    """One answer: text, token ids, why it stopped ("stop", "length", "capacity": the KV cache is full, or
    "timeout": the request's deadline passed, the text is what was decoded until then), and statistics
    (prompt_tokens, tokens, tau, tokens_per_s, per-stage seconds, ...)."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


class Stream(Iterator[str]):
    """One answer's text deltas as speculation rounds are accepted; they join to exactly `result.text`.

    `result` is None until the iteration has finished, then the final `Result`. Closing the stream early
    (`close()`, leaving a `with` block, or garbage collection) stops decoding and frees the pipeline for
    the next request; iterate and close from one thread.
    """

    def __init__(self, run: Callable[[bool], Generator[str, None, Result]], prompt_tokens: int):
        self._run, self._gen = run, None
        self.prompt_tokens = prompt_tokens
        self.result: Result | None = None

    def _start(self, deltas: bool) -> Generator[str, None, Result]:
        if self._gen is None:
            self._gen = self._run(deltas)
        return self._gen

    def __next__(self) -> str:
        try:
            return next(self._start(True))
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value
            raise

    def collect(self) -> Result | None:
        """Decode to the end and return the `Result` (None if the stream was closed first). A stream not
        yet iterated decodes without detokenizing every round."""
        self._start(False)
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop decoding now (no `result` when it had not finished)."""
        if self._gen is not None:
            self._gen.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Pipeline:
    """Bundle + backend + tokenizer + image preprocessing; thread-safe, reusable across requests."""

    def __init__(self, bundle: Bundle, backend: Backend):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        from dream_export.runtime.image_layout import ImageLayout
        from dream_export.runtime.preprocess import ImagePreprocessor

        m = bundle.manifest
        self.bundle, self.backend = bundle, backend
        emb = m["embeddings"]
        tensors = load_file(str(bundle.root / emb["file"]))
        table = tensors[emb["tensor"]].astype(np.float32)
        self.embed_table = table * np.float32(emb.get("scale", 1.0))
        self.tokenizer = Tokenizer.from_file(str(bundle.root / "tokenizer.json"))
        self.preprocess = ImagePreprocessor.from_dict(m["preprocess"])
        self.layout = ImageLayout.from_manifest(m, tensors)
        tok = m["tokens"]
        self.image_token_id, self.eos_id = tok["image_token_id"], tok["eos_id"]
        # every id that ends an answer (generation_config's first; Gemma3 adds <end_of_turn>)
        self.eos_ids = frozenset(tok.get("eos_ids") or [self.eos_id])
        self.image_token = self.tokenizer.id_to_token(self.image_token_id)
        self.bos_token = self.tokenizer.id_to_token(tok["bos_id"]) if tok.get("bos_id") is not None else ""
        self.eos_token = self.tokenizer.id_to_token(self.eos_id)
        # image tokens per image (None when it depends on the image: LLaVA-NeXT's tiles)
        self.n_image_tokens = None if self.layout.variable else self.layout.rows_per_view
        self.template = ChatTemplate(m.get("chat_template"), self.bos_token, self.eos_token, self.image_token,
                                     self.layout.placeholder(self.image_token))
        self.engine = SpecEngine(bundle, backend, self.embed_table)
        self.kv_capacity = self.engine.target.capacity
        self._lock = threading.Lock()
        self.precision = "fp32"

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", threads: int | str | dict[str, int] = 2,
             precision: str = "fp32", verify: bool = False) -> Pipeline:
        """Open a bundle directory with the named backend ('onnxruntime', 'onnxruntime-cuda', 'tensorrt'),
        CPU threads (a number, or per graph: "target=2,draft=1") and graph precision ('fp32', or a variant
        the bundle carries such as 'fp16'). File sizes are checked against the manifest; `verify` also
        checks every file's sha256 (`IntegrityError` names a changed file)."""
        bundle = apply_choice(Bundle.open(path, verify=verify))  # a searched supernet's chosen sub-network
        pipe = cls(bundle, make_backend(backend, bundle, threads, precision))
        pipe.precision = precision
        return pipe

    # ---- request preparation -----------------------------------------------------------------
    def chat_ids(self, messages: Sequence[dict], inputs: dict | None = None) -> list[int]:
        """Prompt token ids of a conversation (see `dream_export.runtime.chat`), image tokens expanded.
        `inputs`: its images already preprocessed (`preprocess.preprocess(images)`), so that counting many
        texts with the same images preprocesses them once."""
        return self._encode(messages, inputs)[0].tolist()

    def prompt_ids(self, prompt: str, image=None, inputs: dict | None = None) -> list[int]:
        """Prompt token ids of one user turn: an image, then `prompt`. The image is needed only where its
        number of image tokens depends on it (e.g. LLaVA-NeXT); `inputs` as for `chat_ids`."""
        # any non-None image stands in when only its placeholder is rendered
        return self.chat_ids(_turn(... if image is None else image, prompt), inputs)

    def _encode(self, messages: Sequence[dict], inputs: dict | None = None) -> tuple[np.ndarray, dict | None]:
        """Prompt ids and the preprocessed images (None without images; `...` images are not preprocessed;
        `inputs`: the real images already preprocessed)."""
        norm, images = normalize(messages)
        real = [im for im in images if im is not ...]
        if not real:
            inputs = None
        elif inputs is None:
            inputs = self.preprocess.preprocess(real)  # unreadable images fail here
        if len(real) != len(images):  # only placeholders: prompt_ids without an image
            texts = [self.layout.text(None, 0, self.image_token) for _ in images]
        else:
            texts = [self.layout.text(inputs, i, self.image_token) for i in range(len(images))]
        text = self.template.render(norm, texts)
        # the tokenizer's own special tokens (llava-hf: the BOS its template leaves out), as the HF
        # processor added them at export
        adds = bool(self.bundle.manifest["tokens"].get("add_special_tokens", False))
        return np.array(self.tokenizer.encode(text, add_special_tokens=adds).ids, dtype=np.int64), inputs

    def chat_embeds(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, float]:
        """Merged prompt embeddings [n,H], image-token mask [n] and the vision time in seconds."""
        return self._embed(*self._encode(messages))

    def prompt_embeds(self, image, prompt: str) -> tuple[np.ndarray, np.ndarray, float]:
        """`chat_embeds` of one user turn: `image` (None: text only), then `prompt`."""
        return self.chat_embeds(_turn(image, prompt))

    def _embed(self, ids: np.ndarray, inputs: dict | None) -> tuple[np.ndarray, np.ndarray, float]:
        # The vision graph runs once per image (over its views) and the rows are spliced over the image
        # tokens in order, as the HF model splices several images.
        t0 = time.perf_counter()
        vb = self.bundle.graph("vision")["bindings"]
        n_images = self.layout.images(inputs)

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return self.backend.run("vision", {vb[k]: v for k, v in feeds.items()})[vb["image_embeds"]]

        feats = self.layout.encode(inputs, n_images, run) if n_images else []
        vision_s = time.perf_counter() - t0
        emb = self.embed_table[ids]
        mask = ids == self.image_token_id
        rows = sum(f.shape[0] for f in feats)
        if mask.sum() != rows:
            raise UsageError(f"prompt has {int(mask.sum())} image tokens but its {n_images} image(s) give {rows}")
        if feats:
            emb[mask] = np.concatenate(feats)
        return emb, mask, vision_s

    def prompt_positions(self, image, prompt: str) -> np.ndarray | None:
        """The rotary positions of `prompt_embeds`' rows (None: 0..n-1)."""
        ids, inputs = self._encode(_turn(image, prompt))
        return self.positions(ids == self.image_token_id, inputs)

    def positions(self, image_mask: np.ndarray, inputs: dict | None) -> np.ndarray | None:
        """The prompt's rotary positions when they are not 0..n-1: Qwen2.5-VL's mRoPE [3, n] over each
        image's grid (`runtime.positions`); tokens after the prompt continue from its rope delta (the engine)."""
        if not self.engine.mrope:
            return None
        grids = [] if inputs is None else inputs["image_grid_thw"].tolist()
        return mrope_positions(image_mask, grids, self.bundle.manifest["decoder"]["spatial_merge_size"])[0]

    # ---- generation --------------------------------------------------------------------------
    def chat_stream(self, messages: Sequence[dict], max_new_tokens: int = 128, mode: str | None = None,
                    tree: TreeSpec | str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, seed: int | None = None, vtc_keep: float | None = None,
                    stop: list[str] | None = None, deadline_s: float | None = None) -> Stream:
        """Answer a conversation as a `Stream` of text deltas (its `result` holds the final `Result`).

        The request is checked now (messages, images, options, KV capacity: `UsageError`,
        `ContextLengthError`); decoding starts on the first `next()`, one request at a time per pipeline
        (concurrent requests wait their turn). `deadline_s`: seconds from the start of decoding after
        which the answer ends with the text so far and finish reason "timeout". Without `mode` (or `tree`
        for that mode) a searched supernet bundle drafts its chosen shape, any other an EAGLE-2 tree.
        """
        if mode is not None and mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(tree, str):
            try:
                tree = TreeSpec.parse(tree)
            except ValueError as e:
                raise UsageError(str(e)) from e
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if deadline_s is not None and not deadline_s > 0:
            raise UsageError(f"deadline_s (--timeout) must be a number of seconds > 0, got {deadline_s!r}")
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        ids, inputs = self._encode(messages)  # unreadable images fail here, before any decoding
        if len(ids) + 1 > self.kv_capacity:
            raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the KV capacity {self.kv_capacity} "
                                     "(prompt tokens, image tokens included, + 1); shorten the prompt or export "
                                     "with a larger --kv-capacity")
        mode, tree = self.engine.default_drafting(mode, tree)
        drafter = self.engine.drafter(mode, tree)  # a tree larger than the bundle's max_tree fails here too

        def run(deltas: bool) -> Generator[str, None, Result]:
            return self._decode(ids, inputs, deltas, max_new_tokens, mode, drafter, sampling, vtc_keep, stop or [],
                                deadline_s)

        return Stream(run, len(ids))

    def chat(self, messages: Sequence[dict], **options) -> Result:
        """Answer a conversation (options as for `chat_stream`)."""
        return self.chat_stream(messages, **options).collect()

    def stream(self, image, prompt: str, **options) -> Stream:
        """`chat_stream` of one user turn: `image` (None: text only), then `prompt` (not empty)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"the prompt (--prompt) is empty ({prompt!r}); ask a question about the image")
        return self.chat_stream(_turn(image, prompt), **options)

    def generate(self, image, prompt: str, **options) -> Result:
        """Answer one (image, prompt) request (options as for `chat_stream`)."""
        return self.stream(image, prompt, **options).collect()

    def _decode(self, ids: np.ndarray, inputs: dict | None, deltas: bool, max_new_tokens: int, mode: str,
                drafter: Drafter, sampling: SamplingParams, vtc_keep: float | None,
                stop: list[str], deadline_s: float | None = None) -> Generator[str, None, Result]:
        """Decode under the pipeline lock, yielding settled text deltas when `deltas`; returns the `Result`.

        Without deltas and stop strings no text is needed before the end, so the answer is detokenized
        once instead of after every round.
        """
        with self._lock:
            t0 = time.perf_counter()
            emb, mask, vision_s = self._embed(ids, inputs)
            self.backend.reset_stats()
            stats = EngineStats()
            tokens: list[int] = []
            text, sent, finish = "", "", "capacity"
            t_dec = time.perf_counter()
            per_round = deltas or bool(stop)  # text is needed every round only to stream it or find a stop

            def detok() -> str:
                return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids])

            rounds = self.engine.generate(emb, mask, max_new_tokens, mode, None, sampling, self.eos_ids, vtc_keep,
                                          stats, drafter, self.positions(mask, inputs))
            try:
                for rnd in rounds:
                    tokens += rnd.tokens
                    if per_round:
                        text = detok()
                        hit = next((s for s in stop if s in text), None)
                        if hit is not None:
                            text = text[: text.index(hit)]
                        settled = _UNSETTLED.sub("", text.lstrip())
                        if deltas and len(settled) > len(sent) and settled.startswith(sent):
                            yield settled[len(sent):]
                            sent = settled
                        if hit is not None:
                            finish = "stop"
                            break
                    if tokens and tokens[-1] in self.eos_ids:
                        finish = "stop"
                        break
                    if len(tokens) >= max_new_tokens:
                        finish = "length"
                        break
                    if deadline_s is not None and time.perf_counter() - t0 >= deadline_s:
                        finish = "timeout"  # checked between rounds: a round is never cut in half
                        break
            finally:
                rounds.close()
            text = text.strip() if per_round else detok().strip()
            if deltas and len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
            end = time.perf_counter()
            secs = dict(stats.seconds)
            secs["vision"] = vision_s
            decode_s = end - t_dec - secs["prefill"]
            # orchestration = decode wall time outside target/draft calls (tree building, masks, copies)
            decode_backend = sum(v for g, v in self.backend.seconds.items() if g != "vision") - secs["prefill"]
            n = len(tokens)
            return Result(text, tokens, finish, {
                "prompt_tokens": len(ids), "images": self.layout.images(inputs),
                "tau": stats.tau, "rounds": stats.rounds, "seconds": secs, "total_seconds": end - t0,
                "decode_seconds": decode_s, "tokens": n, "tokens_per_s": n / max(end - t0, 1e-9),
                "decode_tokens_per_s": max(n - 1, 0) / max(decode_s, 1e-9),
                "host_seconds": max(decode_s - decode_backend, 0.0),
                "backend_seconds": dict(self.backend.seconds), "mode": mode})


def _turn(image, prompt: str) -> list[dict]:
    """One user message: the image (when given), then the text."""
    parts = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
