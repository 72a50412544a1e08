"""A DREAM-S supernet bundle's configurations at run time (manifest `supernet`, see export/subnet.py).

A configuration picks the draft graphs of a head count (physically pruned variants), the target layer
whose features the draft reads (a slice of the target's `taps` output, or its final state) and the
visual keep ratio. `dream-export search` writes the chosen one into the manifest; `Pipeline.load`
applies it, so `run`, `bench` and `serve` use it without options.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dream_export.errors import IncompatibleArtifactError
from dream_export.runtime.bundle import Bundle

DRAFT_SIDE = ("draft", "draft_chain")


@dataclass(frozen=True)
class SubNet:
    """One configuration of a supernet (as the manifest's `supernet.chosen` stores it)."""

    heads: int  # query heads kept in the draft's last self-attention block
    vtc_keep: float  # share of image tokens in the draft's input stream
    layer: int  # target hidden_states index the cross-attention reads (the last one: the final-norm state)

    def label(self) -> str:
        return f"h{self.heads} keep{self.vtc_keep:g} L{self.layer}"


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


def chosen_layer(manifest: dict) -> int | None:
    c = chosen(manifest)
    return c["layer"] if c else None


def chosen_vtc_keep(manifest: dict) -> float | None:
    """The chosen visual keep ratio (None: no compression)."""
    c = chosen(manifest)
    return c["vtc_keep"] if c and c["vtc_keep"] < 1.0 else None
