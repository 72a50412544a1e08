"""Draft training data: the target answers each (image, prompt) greedily; its features are stored.

Per sample: the merged input embeddings of prompt + answer, the final-norm hidden states, the
entropy-selected intermediate feature per token, optional EAGLE-3 taps, the loss mask (positions whose
next token is part of the answer), the image-token mask and each prompt position's visual importance
(attention received in the last layer at prefill). Samples stream into safetensors shards; a rerun
skips finished shards, and refuses to mix data from a different target or recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dream_export.errors import IncompatibleArtifactError, UsageError


@dataclass
class DataConfig:
    """How features are produced; part of the data's identity."""

    max_new_tokens: int = 128
    mid_select: str = "dream"  # one of MID_SELECT (see select_intermediate)
    mid_window: float = 0.4
    taps: tuple[int, ...] = ()
    shard_size: int = 256


MID_SELECT = ("dream", "dream-s", "dream-s-code")


def select_intermediate(attns: list, cfg: DataConfig) -> np.ndarray:
    """Per token, the hidden state of the layer whose attention entropy is lowest (DREAM / DREAM-S).

    attns[l]: [heads, T, T] probabilities of layer l+1. Returns the chosen layer per token, 1-based, i.e.
    an index into the decoder's hidden_states (0 = embeddings, l = output of layer l).

    - "dream": argmin entropy over layers 1..0.4L (DREAM's window, `mid_window`);
    - "dream-s": the DREAM-S paper's rule, entropy + |cross-layer change of entropy|, over layers
      1..0.98L-2; the change is the central difference (one-sided at the window's ends, so no layer is
      exempt from it);
    - "dream-s-code": the stored DREAM-S code, plain argmin entropy over layers 1..0.98L-2.
    """
    import torch

    n_layers = len(attns)
    if cfg.mid_select == "dream":
        window = range(1, max(2, int(round(cfg.mid_window * n_layers))) + 1)
    elif cfg.mid_select in ("dream-s", "dream-s-code"):
        window = range(1, max(2, int(0.98 * n_layers) - 2) + 1)
    else:
        raise UsageError(f"unknown --mid-select {cfg.mid_select!r} ({', '.join(MID_SELECT)})")
    ent = []
    for layer in range(1, n_layers + 1):
        a = attns[layer - 1].clamp_min(1e-12)
        ent.append(-(a * a.log()).sum(-1).mean(0))  # [T], averaged over heads
    ent_t = torch.stack(ent)  # [L, T]
    metric = ent_t
    if cfg.mid_select == "dream-s":
        metric = ent_t + torch.gradient(ent_t, dim=0)[0].abs()
    lo, hi = window.start, window.stop
    choice = torch.argmin(metric[lo - 1: hi - 1], 0) + lo
    return choice.numpy()


def target_identity(model_dir: str | Path) -> str:
    """Short hash of the target's config and weights index (the draft is tied to this target)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = Path(model_dir) / name
        if p.exists():
            h.update(p.read_bytes())
    st = Path(model_dir) / "model.safetensors"
    if st.exists():
        h.update(str(st.stat().st_size).encode())
    return h.hexdigest()[:16]


def _with_answer(enc: dict, answer: list[int]):
    """(input_ids [1,n+a], pixel_values, processor extras) of one prompt encoding followed by `answer`;
    per-token extras (attention_mask, token_type_ids, ...) are extended over the answer as text tokens."""
    import torch

    ids = enc["input_ids"]
    ans = torch.tensor([answer], dtype=ids.dtype)
    extras = {}
    for k, v in enc.items():
        if k in ("input_ids", "pixel_values"):
            continue
        if torch.is_tensor(v) and v.shape == ids.shape:
            v = torch.cat([v, torch.ones_like(ans) if k == "attention_mask" else torch.zeros_like(ans)], 1)
        extras[k] = v
    return torch.cat([ids, ans], 1), enc["pixel_values"], extras


def generate_features(model, processor, rows: list[dict], out_dir: str | Path, cfg: DataConfig,
                      identity: str, progress: bool = True, batch_size: int = 16) -> dict:
    """Answer every row with the target (greedy) and write feature shards to `out_dir`.

    Resumable: finished shards are kept; `index.json` records the target identity and recipe, and a
    rerun with a different one is refused rather than mixing data.
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from dream_export.core.prompts import PromptEncoder
    from dream_export.modeling.importance import column_mean

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"target": identity, "config": {**asdict(cfg), "taps": list(cfg.taps)}, "samples": len(rows)}
    index_path = out_dir / "index.json"
    if index_path.exists():
        old = json.loads(index_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise IncompatibleArtifactError(
                f"{out_dir} holds features from another target or recipe ({old.get('target')}, "
                f"{old.get('config')}); use a new directory")
    index_path.write_text(json.dumps(meta, indent=2))
    from dream_export.families import eos_ids, wrap_vlm

    enc = PromptEncoder(processor)
    vlm = wrap_vlm(model)
    dec = vlm.decoder(cfg.taps)
    img_id = vlm.image_token_id
    eos = set(eos_ids(model, processor.tokenizer))
    pad = processor.tokenizer.pad_token_id
    cut_at_placeholder = 0
    shards = [rows[i:i + cfg.shard_size] for i in range(0, len(rows), cfg.shard_size)]
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc="draft data", disable=not progress, mininterval=5)
    for s_idx, shard in enumerate(shards):
        path = out_dir / f"shard-{s_idx:05d}.safetensors"
        if path.exists():
            bar.update(len(shard))
            continue
        cols: dict[str, list] = {k: [] for k in ("embeds", "final", "mid", "taps", "loss_mask", "image_mask",
                                                 "importance", "input_ids")}
        lengths, prompt_lens = [], []
        for b0 in range(0, len(shard), batch_size):
            batch = shard[b0:b0 + batch_size]
            images = [Image.open(r["image"]).convert("RGB") for r in batch]
            inputs = enc.encode(images, [r["prompt"] for r in batch])
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad)
            plen = inputs["input_ids"].shape[1]
            for j in range(len(batch)):
                ans = gen[j, plen:].tolist()
                stop = next((i for i, t in enumerate(ans) if t in eos), None)
                if stop is not None:
                    ans = ans[: stop + 1]
                if img_id in ans:
                    # A target that writes its own image placeholder: that slot would take an image
                    # feature in any forward, so the answer is kept only up to it.
                    ans = ans[: ans.index(img_id)]
                    cut_at_placeholder += 1
                # One sample, encoded alone: the family's vision inputs (image_sizes, pixel masks,
                # grids) belong to it, however the batch laid them out.
                ids, pixels, extras = _with_answer(dict(enc.encode([images[j]], [batch[j]["prompt"]])), ans)
                prompt_ids = ids[0, : ids.shape[1] - len(ans)]
                with torch.no_grad():
                    merged = vlm.merge(ids, pixels, **extras)
                    t = ids.shape[1]
                    pk, pv = dec.empty_cache()
                    # the family's prefill positions and mask (Gemma3: images read bidirectionally;
                    # Qwen2.5-VL: 3-D positions), as the exported target computes the prompt
                    o = dec(merged, vlm.position_ids(ids, **extras), vlm.prefill_mask(ids, **extras), pk, pv,
                            output_attentions=True, output_hidden_states=True)
                n = len(prompt_ids)
                attns = [a[0] for a in o["attn"]]
                choice = select_intermediate(attns, cfg)
                hs = torch.stack(o["hidden_states"])[:, 0]  # [L+1, T, H]
                mid = hs[torch.from_numpy(choice), torch.arange(t)]
                last = column_mean(attns[-1][:, :n, :n])  # attention each prompt position receives
                imp = torch.zeros(t)
                imp[:n] = last
                lm_mask = torch.zeros(t, dtype=torch.uint8)
                lm_mask[n:t - 1] = 1  # draft predictions made at answer positions
                cols["embeds"].append(merged[0].half())
                cols["final"].append(o["hidden"][0].half())
                cols["mid"].append(mid.half())
                if cfg.taps:
                    cols["taps"].append(torch.cat([x[0] for x in o["taps"]], -1).half())
                cols["loss_mask"].append(lm_mask)
                cols["image_mask"].append((ids[0] == img_id).to(torch.uint8))
                cols["importance"].append(imp)
                cols["input_ids"].append(ids[0])
                lengths.append(t)
                prompt_lens.append(n)
            bar.update(len(batch))
        tensors = {k: torch.cat(v).contiguous() for k, v in cols.items() if v}
        tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64)
        tensors["prompt_lens"] = torch.tensor(prompt_lens, dtype=torch.int64)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
    bar.close()
    if cut_at_placeholder:
        meta["answers_cut_at_image_placeholder"] = cut_at_placeholder
        index_path.write_text(json.dumps(meta, indent=2))
    return meta


class FeatureDataset:
    """All shards of a feature directory, as per-sample tensor dicts."""

    def __init__(self, data_dir: str | Path):
        from safetensors.torch import load_file

        self.dir = Path(data_dir)
        if not (self.dir / "index.json").exists():
            raise UsageError(f"{self.dir} is not a draft feature directory (index.json missing)")
        self.meta = json.loads((self.dir / "index.json").read_text())
        self.samples = []
        for p in sorted(self.dir.glob("shard-*.safetensors")):
            t = load_file(str(p))
            offs = np.concatenate([[0], np.cumsum(t["lengths"].numpy())])
            for i in range(len(t["lengths"])):
                a, b = int(offs[i]), int(offs[i + 1])
                s = {k: v[a:b] for k, v in t.items() if k not in ("lengths", "prompt_lens")}
                s["prompt_len"] = int(t["prompt_lens"][i])
                self.samples.append(s)
        if not self.samples:
            raise UsageError(f"{self.dir} holds no finished shards")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]
