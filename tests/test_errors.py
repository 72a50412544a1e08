"""Every expected failure ends the same way: exit code 2, one line `error: ...` naming the offending file,
option or value, no traceback, and nothing written or changed on disk. The Python API raises the same
typed errors, and a failed request leaves the pipeline ready."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dream_export import cli
from dream_export.errors import DreamExportError, IncompatibleArtifactError, IntegrityError, UsageError
from dream_export.io import file_digest
from dream_export.runtime.engine_meta import DeviceInfo, check_engine, meta_path

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pytest run with tests/ on sys.path
    from bundle_fixture import cached_tiny_bundle

ORIN = DeviceInfo("10.3.0.30", "8.7", "Orin")
ENGINE_META = {"format": "dream-export-engine/1", "component": "target", "engine": "target.engine", "bytes": 20,
               "target": "jetson-orin-nano-8gb", "tensorrt_version": "10.3", "compute_cap": "8.7", "gpu": "Orin"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Directory holding target/, draft/ and bundle/ (the tiny LLaVA pair and its export)."""
    return cached_tiny_bundle(tmp_path_factory.mktemp("tiny")).parent


class Work:
    """A private copy of the tiny target, draft and bundle, plus a valid image, for one case to damage."""

    def __init__(self, root: Path, tiny: Path):
        self.root = root
        for name in ("target", "draft", "bundle"):
            shutil.copytree(tiny / name, root / name)
        self.target, self.draft, self.bundle = root / "target", root / "draft", root / "bundle"
        self.image = root / "scene.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(self.image)

    def run(self, *extra: str) -> list[str]:
        return ["run", str(self.bundle), "--image", str(self.image), "--prompt", "What is there?",
                "--max-new-tokens", "4", *extra]

    def edit_json(self, path: Path, **changes) -> None:
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    def flip_byte(self, path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def truncate(self, path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def export(self) -> list[str]:
        return ["export", str(self.target), "--draft", str(self.draft), "-o", str(self.root / "out"), "--skip-check"]

    def engine(self, **meta) -> Path:
        engine = self.root / "engines" / "jetson" / "target.engine"
        engine.parent.mkdir(parents=True)
        engine.write_bytes(b"serialized engine 01")
        meta_path(engine).write_text(json.dumps({**ENGINE_META, "sha256": file_digest(engine), **meta}))
        return engine


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` pixels (a decompression bomb, cheap to write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _disk_full_export(w: Work, monkeypatch) -> list[str]:
    import torch

    def no_space(module, args, f, *a, **k):  # the first graph write meets a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch.onnx, "export", no_space)
    return w.export()


def _engine_check(w: Work, truncate: bool = False, **meta):
    """The runtime's engine check (TensorRT is absent here) on an engine built for another device or graph."""
    engine = w.engine(**meta)
    if truncate:
        w.truncate(engine)
    return lambda: check_engine(engine, ORIN, "target")


def _too_few_calib_prompts(w: Work) -> list[str]:
    data = w.root / "calib.jsonl"
    data.write_text("".join(json.dumps({"image": str(w.image), "prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    return ["calibrate", str(w.bundle), "--data", str(data), "-o", str(w.root / "out")]


# (id, setup(work, monkeypatch) -> argv or a callable, text the one-line message must contain)
CASES = [
    ("model-dir-missing", lambda w, m: [*w.export()[:1], str(w.root / "nope"), *w.export()[2:]], "nope"),
    ("model-dir-unreadable", lambda w, m: (w.target.joinpath("config.json").write_text("{not json"), w.export())[1],
     "config.json"),
    ("model-unsupported-family", lambda w, m: (w.edit_json(w.target / "config.json", model_type="bert"),
                                               w.export())[1], "'bert'"),
    ("draft-dims-mismatch", lambda w, m: (w.edit_json(w.draft / "draft_config.json", hidden_size=72),
                                          w.export())[1], "hidden_size"),
    ("draft-vocab-mismatch", lambda w, m: (w.edit_json(w.draft / "draft_config.json", vocab_size=7),
                                           w.export())[1], "vocab_size"),
    ("draft-family-mismatch", lambda w, m: (w.edit_json(w.draft / "draft_config.json", norm_flavour="gemma_rms"),
                                            w.export())[1], "norm_flavour"),
    ("safetensors-truncated", lambda w, m: (w.truncate(w.target / "model.safetensors"), w.export())[1],
     "model.safetensors"),
    ("safetensors-corrupt", lambda w, m: (w.draft.joinpath("model.safetensors").write_bytes(b"\xff" * 64),
                                          w.export())[1], "model.safetensors"),
    ("onnx-truncated", lambda w, m: (w.truncate(w.bundle / "onnx/target.onnx"), w.run())[1], "target.onnx"),
    ("onnx-corrupt-run-verify", lambda w, m: (w.flip_byte(w.bundle / "onnx/target.onnx"), w.run("--verify"))[1],
     "target.onnx"),
    ("onnx-corrupt-check", lambda w, m: (w.flip_byte(w.bundle / "onnx/draft.onnx"),
                                         ["check", str(w.bundle)])[1], "draft.onnx"),
    ("manifest-other-format", lambda w, m: (w.edit_json(w.bundle / "manifest.json", format_version=1), w.run())[1],
     "format 1"),
    ("file-changed-after-export", lambda w, m: (w.bundle.joinpath("tokenizer.json").write_text("{}"), w.run())[1],
     "tokenizer.json"),
    ("embeddings-changed-verify", lambda w, m: (w.flip_byte(w.bundle / "embeddings.safetensors"),
                                                w.run("--verify"))[1], "embeddings.safetensors"),
    ("engine-other-gpu", lambda w, m: _engine_check(w, compute_cap="9.0"), "SM 9.0"),
    ("engine-other-tensorrt", lambda w, m: _engine_check(w, tensorrt_version="10.8"), "TensorRT 10.8"),
    ("engine-other-graph", lambda w, m: _engine_check(w, component="draft"), "not the target graph"),
    ("engine-truncated", lambda w, m: _engine_check(w, truncate=True), "target.engine"),
    ("prompt-over-kv-capacity", lambda w, m: [*w.run()[:5], "word " * 400, *w.run()[6:]], "KV capacity"),
    ("image-not-an-image", lambda w, m: (w.image.write_text("hello"), w.run())[1], "scene.png"),
    ("image-empty", lambda w, m: (w.image.write_bytes(b""), w.run())[1], "empty file"),
    ("image-huge", lambda w, m: (_png_header_only(w.image, 100_000, 100_000), w.run())[1], "scene.png"),
    ("prompt-empty", lambda w, m: [*w.run()[:5], "", *w.run()[6:]], "--prompt"),
    ("prompt-whitespace", lambda w, m: [*w.run()[:5], " \n\t", *w.run()[6:]], "--prompt"),
    ("tree-invalid", lambda w, m: w.run("--tree", "0,0,0"), "--tree"),
    ("temperature-negative", lambda w, m: w.run("--temperature", "-1"), "--temperature"),
    ("top-p-zero", lambda w, m: w.run("--top-p", "0"), "--top-p"),
    ("top-p-above-one", lambda w, m: w.run("--top-p", "1.5"), "1.5"),
    ("top-k-negative", lambda w, m: w.run("--top-k", "-3"), "--top-k"),
    ("seed-negative", lambda w, m: w.run("--temperature", "0.7", "--seed", "-1"), "--seed"),
    ("timeout-not-positive", lambda w, m: w.run("--timeout", "0"), "--timeout"),
    ("calibration-too-few-prompts", lambda w, m: _too_few_calib_prompts(w), "calib.jsonl"),
    ("export-disk-full", _disk_full_export, "no space left"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("setup, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(setup, expect, tiny, tmp_path, monkeypatch, capsys):
    w = Work(tmp_path / "w", tiny)
    action = setup(w, monkeypatch)
    before = _snapshot(w.root)
    capsys.readouterr()
    if callable(action):
        run = lambda: cli.report_errors(action)  # noqa: E731  (the API under the CLI's error policy)
    else:
        monkeypatch.setattr(sys, "argv", ["dream-export", *action])
        run = cli.main
    with pytest.raises(SystemExit) as e:
        run()
    out = capsys.readouterr()
    # progress bars (transformers' weight loading) may come before; the message is the last line, alone
    lines = [ln for ln in out.err.strip().splitlines() if not ln.startswith("Loading weights")]
    assert e.value.code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    assert _snapshot(w.root) == before


# ---- the Python API: same typed errors; a failed request leaves the pipeline ready -------------------


@pytest.fixture(scope="module")
def pipe(tiny):
    from dream_export.runtime.pipeline import Pipeline

    return Pipeline.load(tiny / "bundle", threads=1)


def _image(mode: str, size=(24, 20)) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    return rgb.convert(mode)


@pytest.mark.parametrize("bad, error, text", [
    (dict(prompt=""), UsageError, "prompt"),
    (dict(prompt="   "), UsageError, "prompt"),
    (dict(temperature=-0.5), UsageError, "temperature"),
    (dict(temperature=float("nan")), UsageError, "temperature"),
    (dict(top_p=0.0), UsageError, "top_p"),
    (dict(top_k=-1), UsageError, "top_k"),
    (dict(seed=-2, temperature=0.5), UsageError, "seed"),
    (dict(tree="2,x,3"), UsageError, None),
    (dict(mode="tree", tree="4,6,32"), UsageError, "max_tree"),
    (dict(deadline_s=-1), UsageError, "deadline_s"),
    (dict(image=b"not an image"), UsageError, "image"),
])
def test_pipeline_raises_typed_errors_and_stays_ready(pipe, bad, error, text, tmp_path):
    kwargs = dict(image=_image("RGB"), prompt="What is there?", max_new_tokens=4, mode="chain")
    expected = pipe.generate(**kwargs)
    if isinstance(bad.get("image"), bytes):
        (tmp_path / "x.png").write_bytes(bad["image"])
        bad = {**bad, "image": tmp_path / "x.png"}
    with pytest.raises(error, match=text) as e:
        pipe.generate(**{**kwargs, **bad})
    assert isinstance(e.value, DreamExportError) and "\n" not in str(e.value)
    assert pipe.generate(**kwargs).tokens == expected.tokens


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "1x1"])
def test_valid_images_of_every_kind_are_answered(pipe, mode, tmp_path):
    image = _image("RGB", (1, 1)) if mode == "1x1" else _image(mode)
    path = tmp_path / ("img.tif" if mode in ("CMYK", "I;16") else "img.png")
    image.save(path)
    for im in (image, path):  # in memory and from the file
        res = pipe.generate(im, "What is there?", max_new_tokens=3, mode="chain")
        assert res.finish_reason in ("stop", "length", "capacity") and res.tokens


def test_a_chat_turn_with_only_an_image_is_answered(pipe):
    res = pipe.chat([{"role": "user", "content": [{"type": "image", "image": _image("RGB")}]}], max_new_tokens=3,
                    mode="chain")
    assert res.tokens


def test_integrity_errors_are_typed(tiny, tmp_path):
    from dream_export.runtime.bundle import Bundle

    bundle = shutil.copytree(tiny / "bundle", tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"onnx/target.onnx", "onnx/vision.onnx", "embeddings.safetensors", "tokenizer.json"} <= set(manifest["files"])
    Work.flip_byte(None, bundle / "onnx/vision.onnx")
    Bundle.open(bundle)  # sizes only: a same-size edit needs the full check
    with pytest.raises(IntegrityError, match="vision.onnx"):
        Bundle.open(bundle, verify=True)
    assert issubclass(IntegrityError, IncompatibleArtifactError)
