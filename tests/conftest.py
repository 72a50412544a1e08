"""Shared fixtures: the shipped demo VLM, loaded once per session through `from_pretrained`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
DEMO = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"


@pytest.fixture(scope="session")
def demo_vlm():
    """(model, processor) of the shipped demo VLM."""
    from dream_export.demo.model import load_demo

    assert (DEMO / "vlm" / "config.json").exists(), "demo VLM missing: run `make demo-model`"
    return load_demo(DEMO / "vlm")


@pytest.fixture(scope="session")
def demo_target():
    """The shipped demo VLM as a drafting target (explicit-KV decoder, embeddings, LM head)."""
    from dream_export.draft.target import load_target

    return load_target(DEMO / "vlm")


@pytest.fixture(scope="session")
def demo_draft():
    """The shipped DREAM draft of the demo VLM."""
    from dream_export.draft.train import load_draft

    assert (DEMO / "draft" / "draft_config.json").exists(), "demo draft missing: run `make demo-model`"
    return load_draft(DEMO / "draft")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The demo VLM + its DREAM draft exported to a bundle (once per session)."""
    from dream_export.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("demo") / "bundle"
    export_bundle(DEMO / "vlm", DEMO / "draft", out, ExportOptions(kv_capacity=256, max_tree=64), log=lambda _s: None)
    return out


@pytest.fixture(scope="session")
def demo_pipeline(demo_bundle):
    from dream_export.runtime.pipeline import Pipeline

    return Pipeline.load(demo_bundle, threads=2)
