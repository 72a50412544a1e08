"""Calibrated demo bundles for the calibration tests, built once per process.

The demo bundle (conftest's `demo_bundle`) is calibrated on a handful of calibration prompts with a
small feed budget, which keeps the tests fast while exercising the real path end to end.
"""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[tuple, Path] = {}
SAMPLES = 8


def prompt_files(root: Path) -> tuple[Path, Path]:
    """(calib.jsonl with 4 prompts, heldout.jsonl with one prompt per task) under `root`."""
    from dream_export.demo import data, scenes

    if not (root / "calib.jsonl").exists():
        data.write_split(root, "calib", data.train_split(4, base=scenes.CALIB_SEED_BASE))
        data.write_split(root, "heldout", data.heldout_split(1))
    return root / "calib.jsonl", root / "heldout.jsonl"


def calibrated(bundle: Path, work: Path, precision: str = "int8", components: tuple[str, ...] = ("target", "draft"),
               **kw) -> Path:
    """`calibrate_bundle(bundle)` into `work/<precision>-<components>`; cached per arguments."""
    from dream_export.calib.calibrate import calibrate_bundle

    key = (str(bundle), precision, components, tuple(sorted(kw.items())))
    if key not in _CACHE:
        calib, _ = prompt_files(work / "prompts")
        out = work / f"{precision}-{'+'.join(components)}"
        calibrate_bundle(bundle, calib, precision, samples=SAMPLES, components=list(components), out=out,
                         log=lambda _s: None, progress=False, max_new_tokens=24, **kw)
        _CACHE[key] = out
    return _CACHE[key]
