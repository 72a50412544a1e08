"""A pipeline under load: a failed request leaves it ready, concurrent requests are serialised (each answer
equals its sequential answer), and a request deadline returns the text so far with finish reason `timeout`."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from dream_export.errors import UsageError

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pytest run with tests/ on sys.path
    from bundle_fixture import cached_tiny_bundle


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from dream_export.runtime.pipeline import Pipeline

    return Pipeline.load(cached_tiny_bundle(tmp_path_factory.mktemp("tiny")), threads=1)


def _request(i: int) -> dict:
    image = Image.fromarray(np.random.default_rng(i).integers(0, 255, (20 + i, 30, 3), dtype=np.uint8))
    sampled = dict(temperature=0.8, top_p=0.9, seed=i) if i % 2 else {}
    return dict(image=image, prompt=f"Question number {i}?", max_new_tokens=6, mode="chain", **sampled)


def test_concurrent_generate_equals_sequential(pipe):
    requests = [_request(i) for i in range(6)]
    sequential = [pipe.generate(**r).tokens for r in requests]
    answers: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(2):
                tokens = pipe.generate(**requests[i]).tokens
                assert answers.setdefault(i, tokens) == tokens
        except BaseException as e:  # surfaced below: a thread's assertion does not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [answers[i] for i in range(len(requests))] == sequential


def test_failed_requests_leave_the_pipeline_ready(pipe, tmp_path):
    good = _request(0)
    expected = pipe.generate(**good).tokens
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    for bad in (dict(image=tmp_path / "bad.png"), dict(temperature=-1.0), dict(prompt=" ")):
        with pytest.raises(UsageError):
            pipe.generate(**{**good, **bad})
        assert pipe.generate(**good).tokens == expected
    stream = pipe.stream(**{**good, "max_new_tokens": 50})
    next(stream)
    stream.close()  # abandoned mid-answer
    assert pipe.generate(**good).tokens == expected


def test_deadline_returns_the_text_so_far(pipe):
    req = {**_request(0), "max_new_tokens": 40}
    full = pipe.generate(**req)
    late = pipe.generate(**req, deadline_s=1e-9)  # passed before the first round is done
    assert late.finish_reason == "timeout"
    assert late.tokens and full.tokens[: len(late.tokens)] == late.tokens
    assert late.text == pipe.tokenizer.decode([t for t in late.tokens if t != pipe.eos_id]).strip()
    assert pipe.generate(**req, deadline_s=3600).tokens == full.tokens
