"""`bench-serve`: load an OpenAI-compatible endpoint with C concurrent streaming clients and measure it.

Per request: time to first token (first non-empty content delta), latency, completion tokens (from the
final chunk's usage) and the replica that answered. Per concurrency level: requests/s, output tokens/s,
tokens/s per stream, p50/p95 of latency and TTFT.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dream_export.errors import MissingBackendError, UsageError
from dream_export.serve.protocol import data_url


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int
    tau: float
    replica: str
    decode_s: float  # the pipeline's own time for the request (queueing and HTTP excluded)


def _client(url: str):
    try:
        from openai import OpenAI
    except ImportError as e:
        raise MissingBackendError("bench-serve needs the openai client: pip install 'dream-export[serve]'") from e
    base = url.rstrip("/")
    return OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key="none", max_retries=0,
                  timeout=600)


def _one(client, model: str, messages: list, max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    ttft, last = None, None
    for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                             temperature=0.0, stream=True):
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        last = ch
    latency = time.perf_counter() - t0
    spec = (last.model_extra or {}).get("speculation", {}) if last is not None else {}
    tokens = last.usage.completion_tokens if last is not None and last.usage else 0
    return Sample(ttft if ttft is not None else latency, latency, tokens, spec.get("tau", 0.0),
                  spec.get("replica", "?"), spec.get("total_seconds", 0.0))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else 0.0


def run_level(client, model: str, requests: list[list], concurrency: int, max_tokens: int) -> dict:
    """Send every request once, `concurrency` at a time; aggregate."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(lambda m: _one(client, model, m, max_tokens), requests))
    wall = time.perf_counter() - t0
    lat, ttft = [s.latency for s in samples], [s.ttft for s in samples]
    tokens = sum(s.tokens for s in samples)
    return {"concurrency": concurrency, "requests": len(samples), "seconds": wall,
            "requests_per_s": len(samples) / wall, "output_tokens_per_s": tokens / wall,
            "stream_tokens_per_s": float(np.mean([s.tokens / s.latency for s in samples])),
            "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95),
            "latency_p50": _pct(lat, 50), "latency_p95": _pct(lat, 95),
            "tau": float(np.mean([s.tau for s in samples])), "completion_tokens": tokens,
            "pipeline_seconds": sum(s.decode_s for s in samples),
            "replicas": len({s.replica for s in samples}), "samples": [asdict(s) for s in samples]}


def bench_serve(url: str, rows: list[dict], concurrencies: list[int], n_requests: int | None = None,
                max_tokens: int = 128, warmup: int = 2, log=print) -> dict:
    """Measure `url` at each concurrency level with the (image, prompt) rows, cycled to `n_requests`."""
    if any(c < 1 for c in concurrencies):
        raise UsageError("--concurrency must be at least 1")
    client = _client(url)
    try:
        model = client.models.list().data[0].id
    except Exception as e:  # connection refused, not an OpenAI endpoint, ...
        raise UsageError(f"no OpenAI-compatible server answers at {url} ({e})") from e
    urls = {r["image"]: data_url(r["image"]) for r in rows}
    msgs = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[r["image"]]}},
                                          {"type": "text", "text": r["prompt"]}]}] for r in rows]
    n = n_requests or len(msgs)
    requests = [msgs[i % len(msgs)] for i in range(n)]
    for m in requests[:warmup]:
        _one(client, model, m, max_tokens)
    levels = []
    for c in concurrencies:
        lv = run_level(client, model, requests, c, max_tokens)
        log(f"concurrency {c}: {lv['requests_per_s']:.2f} req/s, {lv['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {lv['ttft_p50'] * 1e3:.0f} ms, latency p50/p95 {lv['latency_p50']:.2f}/"
            f"{lv['latency_p95']:.2f} s, {lv['replicas']} replica(s)")
        levels.append(lv)
    return {"url": url, "model": model, "max_tokens": max_tokens, "levels": levels}


def plot(summary: dict, path: str | Path) -> None:
    """Throughput and latency against concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingBackendError("--plot needs matplotlib: pip install matplotlib") from e
    lv = summary["levels"]
    c = [x["concurrency"] for x in lv]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [x["requests_per_s"] for x in lv], "o-", label="requests/s")
    a.plot(c, [x["output_tokens_per_s"] / 100 for x in lv], "s--", label="output tokens/s ÷ 100")
    a.set_xlabel("concurrent clients")
    a.set_title("throughput")
    a.legend()
    for key, style in (("latency_p50", "o-"), ("latency_p95", "o--"), ("ttft_p50", "s-"), ("ttft_p95", "s--")):
        b.plot(c, [x[key] for x in lv], style, label=key.replace("_", " "))
    b.set_xlabel("concurrent clients")
    b.set_ylabel("seconds")
    b.set_title("latency")
    b.legend()
    fig.suptitle(f"{summary['model']} at {summary['url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
