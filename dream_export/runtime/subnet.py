"""A DREAM-S supernet bundle's configurations at run time (manifest `supernet`, see export/subnet.py).

A configuration picks the draft graphs of a head count (physically pruned variants), the target layer
whose features the draft reads (a slice of the target's `taps` output, or its final state), the
visual keep ratio and, optionally, the drafting shape (a chain or an EAGLE-2 tree: how many nodes each
verify pass carries). `dream-export search` writes the chosen one into the manifest; `Pipeline.load`
applies it, so `run`, `bench` and `serve` use it without options.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dream_export.errors import IncompatibleArtifactError
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.tree import TreeSpec

DRAFT_SIDE = ("draft", "draft_chain")


@dataclass(frozen=True)
class SubNet:
    """One configuration of a supernet (as the manifest's `supernet.chosen` stores it)."""

    heads: int  # query heads kept in the draft's last self-attention block
    vtc_keep: float  # share of image tokens in the draft's input stream
    layer: int  # target hidden_states index the cross-attention reads (the last one: the final-norm state)
    tree: str | None = None  # drafting shape "K,DEPTH,TOTAL" (K = 1: a chain); None: the runtime's default

    def label(self) -> str:
        shape = "" if self.tree is None else (f" chain{self.shape.depth}" if self.shape.k == 1 else f" tree{self.tree}")
        return f"h{self.heads} keep{self.vtc_keep:g} L{self.layer}{shape}"

    @property
    def shape(self) -> TreeSpec | None:
        """The drafting shape as a `TreeSpec` (None: not chosen)."""
        return None if self.tree is None else TreeSpec.parse(self.tree)

    @property
    def mode(self) -> str | None:
        """The pipeline mode that drafts `shape`: chain for K = 1, else tree (None: not chosen)."""
        shape = self.shape
        return None if shape is None else "chain" if shape.k == 1 else "tree"

    def as_option(self) -> str:
        """The `export --subnet` text of this configuration."""
        return f"heads={self.heads},vtc_keep={self.vtc_keep:g},layer={self.layer}" + (
            f",tree={self.tree}" if self.tree else "")


def chosen(manifest: dict) -> dict | None:
    """The configuration the bundle's manifest selects ({"heads", "vtc_keep", "layer"}), or None."""
    return (manifest.get("supernet") or {}).get("chosen")


def with_heads(bundle: Bundle, heads: int) -> Bundle:
    """A view of `bundle` whose draft-side graphs are those of the `heads` variant (the files stay)."""
    sn = bundle.manifest.get("supernet")
    if sn is None or heads == sn["main_heads"]:
        return bundle
    variant = sn["variants"].get(str(heads))
    if variant is None:
        raise IncompatibleArtifactError(f"{bundle.root} has no draft graphs with {heads} heads "
                                        f"(has {[sn['main_heads'], *map(int, sn['variants'])]})")
    graphs = {k: v for k, v in bundle.manifest["graphs"].items() if k not in DRAFT_SIDE}
    graphs.update(variant)
    return replace(bundle, manifest={**bundle.manifest, "graphs": graphs})


def apply_choice(bundle: Bundle) -> Bundle:
    """`bundle` with its chosen configuration's draft graphs (itself when it has no choice)."""
    c = chosen(bundle.manifest)
    return with_heads(bundle, c["heads"]) if c else bundle


def feature_columns(manifest: dict, layer: int | None) -> slice | None:
    """Columns of the target's `taps` output holding `layer`'s features; None: the final hidden state."""
    sn = manifest.get("supernet")
    if sn is None or layer is None or layer == sn["layers"][-1]:
        return None
    if layer not in sn["taps"]:
        raise IncompatibleArtifactError(f"the target graph does not expose layer {layer} (exposes {sn['taps']}); "
                                        "re-export the supernet bundle")
    h = manifest["dims"]["hidden"]
    i = sn["taps"].index(layer)
    return slice(i * h, (i + 1) * h)


def chosen_shape(manifest: dict) -> tuple[str, TreeSpec] | None:
    """(mode, shape) of the chosen configuration's drafting shape, or None when none was chosen."""
    c = chosen(manifest)
    if not c or not c.get("tree"):
        return None
    sub = SubNet(**c)
    return sub.mode, sub.shape


def chosen_layer(manifest: dict) -> int | None:
    c = chosen(manifest)
    return c["layer"] if c else None


def chosen_vtc_keep(manifest: dict) -> float | None:
    """The chosen visual keep ratio (None: no compression)."""
    c = chosen(manifest)
    return c["vtc_keep"] if c and c["vtc_keep"] < 1.0 else None
