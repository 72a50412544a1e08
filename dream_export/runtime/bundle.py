"""Open a bundle directory: validate its manifest and hand out paths and I/O facts (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dream_export.core import integrity
from dream_export.errors import IncompatibleArtifactError, UsageError

# The graphs every bundle has (the manifest names their I/O); `draft_chain` is optional.
GRAPHS = ("vision", "target", "draft")

# 2: full sha256 graph digests (see export/bundle.py FORMAT_VERSION)
SUPPORTED_FORMAT_VERSIONS = (2,)


@dataclass
class Bundle:
    """A loaded manifest plus its directory."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> Bundle:
        """Read and check `manifest.json`; refuse unknown formats and missing, truncated or edited files.

        The size of every file the manifest records is always checked; `verify` also compares each
        file's sha256 (reads the whole bundle). Nothing is written, so a read-only bundle opens.
        """
        root = Path(path)
        mpath = root / "manifest.json"
        if not root.is_dir():
            raise UsageError(f"{root} is not a bundle (no such directory); create one with `dream-export export`")
        if not mpath.exists():
            raise UsageError(f"{root} is not a bundle (manifest.json missing); create one with `dream-export export`")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IncompatibleArtifactError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from e
        if not isinstance(manifest, dict) or manifest.get("format") != "dream-export-bundle":
            raise IncompatibleArtifactError(f"{mpath} is not a dream-export manifest")
        version = manifest.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            newest = max(SUPPORTED_FORMAT_VERSIONS)
            age = ("older than" if isinstance(version, int) and version < min(SUPPORTED_FORMAT_VERSIONS)
                   else "not one of")
            raise IncompatibleArtifactError(
                f"{root} has bundle format {version}, {age} the formats this dream-export reads "
                f"({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export it with `dream-export export` "
                f"(and rerun calibrate/build on the new bundle) to get format {newest}")
        b = cls(root, manifest)
        for name in GRAPHS:
            if name not in manifest.get("graphs", {}):
                raise IncompatibleArtifactError(f"manifest lists no {name} graph")
            if not b.graph_path(name).exists():
                raise IncompatibleArtifactError(f"{b.graph_path(name)} is missing from the bundle")
        integrity.verify(root, manifest.get("files", {}), full=verify)
        if verify:  # CPU builds record their own files (engines/cpu/build.json); TensorRT engines their metadata
            for build in sorted(root.glob("engines/*/build.json")):
                files = json.loads(build.read_text()).get("files")
                if isinstance(files, dict):
                    integrity.verify(build.parent, files, full=True)
        return b

    def graph(self, name: str) -> dict:
        """Manifest entry of a graph (file, inputs, outputs)."""
        return self.manifest["graphs"][name]

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        """File of a graph in the given precision variant (fp32 is the exported graph itself)."""
        entry = self.manifest["graphs"][name]
        if precision == "fp32":
            return self.root / entry["file"]
        variant = entry.get("variants", {}).get(precision)
        if variant is None:
            have = ["fp32", *entry.get("variants", {})]
            raise IncompatibleArtifactError(f"bundle has no {precision} {name} graph (has {', '.join(have)}); "
                                            f"create it with `dream-export export --precision {precision}`")
        return self.root / variant["file"]

    def chain_graph_usable(self, precision: str = "fp32") -> bool:
        """Whether the optional draft_chain graph exists in `precision` and was made from this draft graph."""
        entry = self.manifest["graphs"].get("draft_chain")
        if not entry or entry.get("pairs_with") != self.graph("draft").get("sha256"):
            return False  # absent, or the draft was replaced (calibrated) after the chain graph was exported
        try:
            return self.graph_path("draft_chain", precision).exists()
        except IncompatibleArtifactError:
            return False

    def input_names(self, name: str) -> list[str]:
        return [i["name"] for i in self.graph(name)["inputs"]]

    def output_names(self, name: str) -> list[str]:
        return [o["name"] for o in self.graph(name)["outputs"]]

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]
