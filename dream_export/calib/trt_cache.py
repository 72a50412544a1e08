"""TensorRT's text calibration cache, for implicit INT8 builds (`trtexec --int8 --calib=FILE`, TensorRT 8.x).

Format (what `IInt8Calibrator::writeCalibrationCache` emits and `readCalibrationCache` takes back):

    TRT-8502-EntropyCalibration2
    tensor_name: 3caa54fc
    ...

The header is `TRT-<NV_TENSORRT_VERSION>-<algorithm>`; each line is an ONNX tensor name (TensorRT's
parser names its tensors after them) and the scale `amax / 127` as the big-endian hex of its IEEE-754
float32 bits. TensorRT refuses a cache whose algorithm differs from its calibrator's, and trtexec's
calibrator is an `IInt8EntropyCalibrator2`, so the header names that algorithm whatever method produced
the ranges (the manifest records the method). It also refuses a cache from another TensorRT version:
`--trt-version` picks the device's.
"""

from __future__ import annotations

import struct
from pathlib import Path

from dream_export.errors import IncompatibleArtifactError, UsageError
from dream_export.io import atomic_write_text

ALGORITHM = "EntropyCalibration2"
QMAX = 127.0


def version_number(version: str) -> int:
    """NV_TENSORRT_VERSION of a release: 8.x → 8502 (major·1000 + minor·100 + patch), 10.x → 100300."""
    try:
        parts = [int(p) for p in str(version).split(".")]
    except ValueError as e:
        raise UsageError(f"TensorRT version must look like 8.5.2 or 10.3.0, got {version!r}") from e
    major, minor, patch = (parts + [0, 0, 0])[:3]
    if major < 8 or not (0 <= minor < 100 and 0 <= patch < 100):
        raise UsageError(f"TensorRT version {version!r}: implicit-INT8 calibration caches need TensorRT 8 or newer")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """8 hex digits of the float32 bit pattern, most significant first."""
    return f"{struct.unpack('>I', struct.pack('>f', scale))[0]:08x}"


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", struct.pack(">I", int(text, 16)))[0]


def format_cache(amax: dict[str, float], trt_version: str = "8.5.2") -> str:
    """Cache text for tensor → amax (max |activation|); tensors sorted by name for stable diffs."""
    lines = [f"TRT-{version_number(trt_version)}-{ALGORITHM}"]
    for name in sorted(amax):
        if ": " in name or "\n" in name:  # the parser splits on the last ': '
            raise UsageError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {scale_to_hex(float(amax[name]) / QMAX)}")
    return "\n".join(lines) + "\n"


def write_cache(path: str | Path, amax: dict[str, float], trt_version: str = "8.5.2") -> Path:
    """Write the cache atomically; returns its path."""
    atomic_write_text(path, format_cache(amax, trt_version))
    return Path(path)


def parse_cache(path_or_text: str | Path) -> tuple[str, dict[str, float]]:
    """(header, tensor → scale) of a cache file or text; the scale is amax / 127."""
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else str(path_or_text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise IncompatibleArtifactError("not a TensorRT calibration cache (first line must be TRT-<version>-<algo>)")
    scales = {}
    for n, ln in enumerate(lines[1:], 2):
        # tensor names may themselves contain ': ' in TensorRT's unnamed layers; the scale is the last field
        name, sep, hexval = ln.rpartition(": ")
        if not sep:
            raise IncompatibleArtifactError(f"calibration cache line {n}: expected 'tensor: hexscale', got {ln!r}")
        try:
            scales[name] = hex_to_scale(hexval.strip())
        except (ValueError, struct.error) as e:
            raise IncompatibleArtifactError(f"calibration cache line {n}: {hexval!r} is not a hex float32") from e
    return lines[0], scales
