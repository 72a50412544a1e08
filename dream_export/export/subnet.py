"""What `export` does with a DREAM-S supernet draft (one with `supernet.json`).

- Without a chosen sub-network: the full draft is the bundle's draft graph, and every smaller head
  count gets its own physically pruned draft (and chain) graphs, `onnx/draft.h<N>.onnx`; the target
  graph exposes the injectable earlier layers through its final norm. `dream-export search` measures
  the configurations on that bundle and writes its choice into the manifest.
- With one (`--subnet heads=2,vtc_keep=0.75,layer=22`): only that sub-network is exported, its heads
  pruned, the target exposing only the layer it reads. Its pruned torch draft is saved in the bundle
  (`subnet-draft/`) so that parity checks the graphs against the draft they were made from.

The manifest's `supernet` entry: `layers` (injectable, hidden_states numbering; the last is the final
state), `taps` (the order of the target's `taps` output), `head_choices`, `vtc_keeps`, `main_heads`
(heads of the bundle's own draft graph), `variants` (head count → draft-side graph entries) and
`chosen` (the configuration the runtime applies, or null).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SUBNET_DRAFT_DIR = "subnet-draft"


@dataclass
class SupernetExport:
    """The export plan of a draft: inactive for a plain draft."""

    draft: object  # the Draft to export as the bundle's draft graph (pruned for a chosen sub-network)
    source: object = None  # the full supernet Draft
    spec: object = None  # SupernetSpec
    sub: object = None  # SubNet, when one was chosen

    @classmethod
    def of(cls, draft, draft_dir: str | Path, subnet: str | None) -> SupernetExport:
        """Plan the export of `draft` (loaded from `draft_dir`), with sub-network `subnet` if given."""
        from dream_export.draft.supernet import SupernetSpec, parse_subnet, prune
        from dream_export.errors import UsageError

        spec = SupernetSpec.load(draft_dir)
        if spec is None:
            if subnet:
                raise UsageError(f"--subnet needs a supernet draft; {draft_dir} has no supernet.json "
                                 "(train one with `train-draft --supernet`)")
            return cls(draft)
        if subnet is None:
            return cls(draft, draft, spec)
        sub = parse_subnet(subnet, spec)
        return cls(prune(draft, spec, sub.heads), draft, spec, sub)

    @property
    def active(self) -> bool:
        return self.spec is not None

    @property
    def taps(self) -> tuple[int, ...]:
        """Target layers the target graph must expose (through its final norm)."""
        if not self.active:
            return ()
        if self.sub is None:
            return tuple(self.spec.taps)
        return () if self.sub.layer == self.spec.final_layer else (self.sub.layer,)

    def manifest_entry(self, export_draft: Callable[[object, int], dict]) -> dict:
        """The manifest's `supernet` entry; `export_draft(draft, heads)` exports a pruned variant's graphs."""
        from dream_export.draft.supernet import prune

        spec = self.spec
        variants = {}
        if self.sub is None:
            for heads in spec.head_choices:
                if heads != spec.num_heads:
                    variants[str(heads)] = export_draft(prune(self.source, spec, heads), heads)
        return {"layers": spec.layers, "taps": list(self.taps), "head_choices": spec.head_choices,
                "vtc_keeps": spec.vtc_keeps, "num_heads": spec.num_heads, "head_order": spec.head_order,
                "main_heads": self.sub.heads if self.sub else spec.num_heads, "variants": variants,
                "chosen": asdict(self.sub) if self.sub else None}

    def save_draft(self, bundle_tmp: Path) -> None:
        """Save the exported sub-network's torch draft in the bundle (what parity compares against)."""
        if self.sub is None:
            return
        from dream_export.draft.train import save_draft

        save_draft(self.draft, Path(bundle_tmp) / SUBNET_DRAFT_DIR,
                   {"supernet_subnet": asdict(self.sub), "head_order": self.spec.head_order})
