"""Before an export: the target and draft directories are readable, supported and made for each other.

Each problem raises the project's typed errors with a one-line message naming the file or field, so a
bad checkpoint is refused in a second instead of failing deep inside transformers or the exporter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dream_export.errors import IncompatibleArtifactError, UsageError

# Draft config fields that must equal what the target implies (DraftConfig.from_target), and why.
_MATCH = {"hidden_size": "hidden size (dims)", "vocab_size": "vocabulary size",
          "norm_flavour": "model family (norm flavour)", "target_num_layers": "target layer count"}


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not a {what} directory ({path.name} missing)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({e}); pass a saved {what} directory") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object; pass a saved {what} directory")
    return data


def check_weights(directory: Path) -> None:
    """Every *.safetensors file opens (a truncated or corrupt one names itself)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise IncompatibleArtifactError(f"{directory} has no *.safetensors weights; save the model with "
                                        "safe_serialization=True")
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():  # reading each tensor checks its byte range lies inside the file
                    st.get_slice(key)
            if f.stat().st_size < 8:
                raise ValueError("shorter than a header")
        except Exception as e:  # safetensors raises its own SafetensorError (not exported) or OSError
            raise IncompatibleArtifactError(f"{f} is truncated or corrupt ({str(e).splitlines()[0]}); "
                                            "copy or save the checkpoint again") from e


def check_sources(target_dir: str | Path, draft_dir: str | Path) -> None:
    """Refuse an unreadable or unsupported target, a damaged checkpoint, or a draft made for another model."""
    from transformers import AutoConfig

    from dream_export.draft.config import DraftConfig
    from dream_export.families import family_of

    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    _json(target_dir / "config.json", "model")
    try:
        config = AutoConfig.from_pretrained(str(target_dir))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{target_dir / 'config.json'} is not a model config transformers reads "
                         f"({str(e).splitlines()[0]}); pass a saved Hugging Face checkpoint") from e
    family_of(config)
    draft_cfg = _json(draft_dir / "draft_config.json", "draft")
    want = DraftConfig.from_target(config.get_text_config(), arch=draft_cfg.get("arch", "dream")).__dict__
    for key, what in _MATCH.items():
        if key in draft_cfg and draft_cfg[key] != want.get(key):
            raise IncompatibleArtifactError(
                f"draft {draft_dir} does not match target {target_dir}: {what} {key}={draft_cfg[key]!r} in "
                f"draft_config.json, the target needs {want.get(key)!r}; train a draft for this target")
    check_weights(target_dir)
    check_weights(draft_dir)


def relative_to_bundle(path: str | Path, bundle_dir: str | Path) -> str:
    """`path` as the manifest records it: relative to the bundle, so a bundle moved together with its
    sources (or a checkout cloned elsewhere) still finds them, and no machine's absolute paths leak."""
    return Path(os.path.relpath(Path(path).resolve(), Path(bundle_dir).resolve())).as_posix()


def source_dir(manifest: dict, bundle_dir: str | Path, which: str) -> Path:
    """The `target` or `draft` directory a bundle was exported from (absolute paths of older bundles kept)."""
    path = Path(manifest["source"][which]["path"])
    return path if path.is_absolute() else (Path(bundle_dir) / path).resolve()


def source_configs(manifest: dict, bundle_dir: str | Path) -> tuple[dict, dict | None]:
    """(target `config.json`, `draft_config.json` or None) of the checkpoints a bundle was exported from."""
    tgt = source_dir(manifest, bundle_dir, "target") / "config.json"
    if not tgt.exists():
        raise UsageError(f"the bundle's source model {tgt.parent} is not on this machine; pass its config.json")
    drf = source_dir(manifest, bundle_dir, "draft") / "draft_config.json"
    return json.loads(tgt.read_text()), json.loads(drf.read_text()) if drf.exists() else None


def rebase_sources(manifest: dict, old_root: str | Path, new_root: str | Path) -> None:
    """Re-express the recorded source paths for a manifest copied from bundle `old_root` into `new_root`."""
    for which, entry in manifest.get("source", {}).items():
        if isinstance(entry, dict) and "path" in entry:
            entry["path"] = relative_to_bundle(source_dir(manifest, old_root, which), new_root)
