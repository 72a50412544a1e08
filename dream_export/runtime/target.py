"""The target graph over the runtime-owned KV cache: prefill and tree verification calls, row commits."""

from __future__ import annotations

import numpy as np

from dream_export.runtime.backend_base import Backend, aligned_zeros
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.masks import cache_mask, row_index
from dream_export.runtime.subnet import chosen_layer, feature_columns
from dream_export.runtime.vtc import vtc_score_output


class TargetRunner:
    """Calls the target graph and owns its KV cache [layers,1,kv_heads,capacity,head_dim].

    A call returns only the new rows' keys and values; `commit` writes the ones that stay into place, so
    nothing grows with the context. Graph I/O names come from the manifest's bindings table.
    """

    def __init__(self, bundle: Bundle, backend: Backend):
        m, d = bundle.manifest, bundle.manifest["dims"]
        self.backend = backend
        self.bindings = bundle.graph("target")["bindings"]
        self.capacity = m["kv_capacity"]
        # masks as wide as the used cache rows (attention then costs what the context holds, not what the
        # cache could hold), where the graph was exported to read only those
        self.used_slots = bundle.graph("target").get("slots") == "used"
        self.eagle3_taps = m["draft"]["eagle3_taps"]
        # a supernet sub-network may read an earlier layer's features: their columns of the taps output
        self.feature_columns = feature_columns(m, chosen_layer(m))
        # which last-layer attention score ranks image tokens for visual-token compression (runtime.vtc)
        self.vtc_score = "mean"
        # 256-byte aligned: TensorRT binds resident buffers by address (setTensorAddress requires it)
        shape = (d["layers"], 1, d["kv_heads"], self.capacity, d["head_dim"])
        self.key, self.value = aligned_zeros(shape), aligned_zeros(shape)
        backend.register_resident("target", self.bindings["past_key"], self.key)
        backend.register_resident("target", self.bindings["past_value"], self.value)

    def run(self, embeds: np.ndarray, positions: np.ndarray, new_mask: np.ndarray, rows, past: int) -> dict:
        """One call over `past` committed slots: `embeds` [N,H] at `positions` ([N], mRoPE [3,N]), `new_mask` [N,N] among
        themselves; logits for the node indices `rows`. Outputs by graph name (see `out`)."""
        b = self.bindings
        feeds = {b["inputs_embeds"]: embeds[None].astype(np.float32, copy=False),
                 # [N] → [1, N]; mRoPE's [3, N] as it is
                 b["position_ids"]: (positions if positions.ndim == 2 else positions[None]).astype(np.int64),
                 b["attention_mask"]: cache_mask(self.capacity, past, None, new_mask, self.used_slots)[None],
                 b["past_key"]: self.key, b["past_value"]: self.value,
                 b["logit_rows"]: np.asarray(rows, dtype=np.int64)}
        return self.backend.run("target", feeds)

    def out(self, out: dict, role: str) -> np.ndarray:
        """A call's output by role (`row_logits`, `topk_ids`, `hidden`, ...)."""
        return out[self.bindings[role]]

    def commit(self, out: dict, rows: np.ndarray, at: int) -> None:
        """Write the call's new KV rows `rows` (node indices) into slots `at`, `at + 1`, ..."""
        pick = row_index(rows)
        # through the backend, which keeps any device copy of the cache in step
        self.backend.write_rows(self.key, 3, at, self.out(out, "new_key")[:, :, :, pick])
        self.backend.write_rows(self.value, 3, at, self.out(out, "new_value")[:, :, :, pick])

    def features(self, out: dict) -> np.ndarray:
        """What the draft reads of each new row [N, F]: the final hidden state, the EAGLE-3 taps, or a
        supernet sub-network's injected layer."""
        if self.feature_columns is not None:
            return self.out(out, "taps")[0][:, self.feature_columns]
        return self.out(out, "taps" if self.eagle3_taps else "hidden")[0]

    def prompt_importance(self, out: dict, n: int, score: str | None = None) -> np.ndarray | None:
        """Attention each of a prefill's `n` prompt rows receives in the last layer, scored as `score`
        ("mean" or "max", default `vtc_score`), or None when the graph was exported without it.

        The graph's vector covers the mask's cache columns (a slot bucket, all masked at prefill) and then
        the new rows: the prompt's share is its last `n` entries.
        """
        name = vtc_score_output(score or self.vtc_score)
        if name not in self.bindings:
            return None
        imp = self.out(out, name)
        return imp[len(imp) - n:]
