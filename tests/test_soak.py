"""Soak: 1,000 generations in one pipeline; memory stays flat (RSS after the 1,000th within 5% of after
the 100th). The generations run in a fresh process that imports only the runtime (the test process holds
torch, which would dilute the figure). Prints the figures (recorded in docs/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GENERATIONS = 1000
CHECKPOINTS = (100, 500, GENERATIONS)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def soak(bundle: str) -> dict[int, int]:
    """Run the generations in this process; RSS (bytes) after each checkpoint."""
    import numpy as np
    from PIL import Image

    from dream_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=1)
    rng = np.random.default_rng(0)
    modes = ("tree", "chain", "ar")
    rss = {}
    for i in range(1, GENERATIONS + 1):
        # every request different: image size, prompt, mode, greedy or sampled, streamed or not, some abandoned
        image = Image.fromarray(rng.integers(0, 255, (int(rng.integers(8, 64)), int(rng.integers(8, 64)), 3),
                                             dtype=np.uint8))
        opts = dict(max_new_tokens=int(rng.integers(1, 24)), mode=modes[i % 3],
                    tree="2,3,6" if i % 3 == 0 else None)
        if i % 2:
            opts.update(temperature=0.7, top_p=0.9, seed=i)
        prompt = f"Q{i}" + "?" * int(rng.integers(1, 5))  # the tiny bundle holds 64 tokens
        if i % 10 == 0:
            with pipe.stream(image, prompt, **opts) as stream:
                next(stream, None)  # abandoned after the first delta
        else:
            assert pipe.generate(image, prompt, **opts).tokens
        if i in CHECKPOINTS:
            rss[i] = _rss_bytes()
    return rss


@pytest.mark.slow
def test_thousand_generations_keep_rss_flat(tmp_path_factory):
    try:
        from tests.bundle_fixture import cached_tiny_bundle
    except ImportError:  # pytest run with tests/ on sys.path
        from bundle_fixture import cached_tiny_bundle

    bundle = cached_tiny_bundle(tmp_path_factory.mktemp("tiny"))
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, __file__, str(bundle)], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}, check=True)
    rss = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    growth = rss[GENERATIONS] / rss[100] - 1
    print("\nRSS after " + ", ".join(f"{n} generations {rss[n] / 2**20:.1f} MiB" for n in CHECKPOINTS)
          + f" ({growth * 100:+.2f}% from the 100th to the {GENERATIONS}th)")
    assert abs(growth) <= 0.05


if __name__ == "__main__":
    print(json.dumps(soak(sys.argv[1])))
