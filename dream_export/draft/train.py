"""Distillation of a draft against its target's stored features (DREAM recipe, EAGLE baselines)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dream_export.draft.config import DraftConfig
from dream_export.draft.data import FeatureDataset
from dream_export.draft.model import Draft, init_weights, soft_cap
from dream_export.errors import IncompatibleArtifactError
from dream_export.io import atomic_dir, warmup_cosine
from dream_export.runtime.vtc import vtc_keep_indices


@dataclass
class DraftTrainConfig:
    """Optimisation recipe; DREAM's loss weights and optimiser settings by default."""

    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.5
    w_logits: float = 1.0
    w_feature: float = 0.2
    w_mid: float = 0.2
    noise: float = 0.2  # EAGLE-style uniform noise on the target features (see feature_noise)
    self_feed: bool = True  # a second pass on the draft's own predicted features (training-time test)
    vtc_keep: float | None = None  # train the draft on visual-token-compressed streams
    seed: int = 0
    threads: int = 2


def _lr(step: int, c: DraftTrainConfig) -> float:
    return warmup_cosine(step, c.lr, c.warmup, c.steps, c.min_lr_ratio)


def feature_noise(f: torch.Tensor, noise: float) -> torch.Tensor:
    """EAGLE/DREAM's augmentation of one sample's features [T, F]: uniform noise of width noise·512/T
    (`(rand - 0.5) * std * 512 / seq_len`), so short sequences get proportionally more."""
    return (torch.rand_like(f) - 0.5) * (noise * 512 / f.shape[0])


def collate(samples: list[dict], draft: Draft, vtc_keep: float | None, noise: float, use_taps: bool) -> dict:
    """Pad a batch; queries may drop visual tokens (VTC) while the cross features keep every position."""
    b = len(samples)
    qs = []
    for s in samples:
        if vtc_keep is not None:
            qs.append(vtc_keep_indices(s["image_mask"].numpy().astype(bool), s["importance"].numpy(), vtc_keep))
        else:
            qs.append(np.arange(len(s["input_ids"])))
    tq = max(len(q) for q in qs)
    tk = max(len(s["input_ids"]) for s in samples)
    h = samples[0]["final"].shape[1]
    z = lambda *shape, dt=torch.float32: torch.zeros(*shape, dtype=dt)  # noqa: E731
    out = {"embeds": z(b, tq, h), "final_q": z(b, tq, h), "mid_q": z(b, tq, h), "feats": z(b, tk, h),
           "loss_mask": z(b, tq), "q_valid": z(b, tq, dt=torch.bool), "k_valid": z(b, tk, dt=torch.bool),
           "q_pos": torch.full((b, tq), 10**6, dtype=torch.long), "resp": z(b, tk, dt=torch.bool)}
    if use_taps:
        out["taps"] = z(b, tk, samples[0]["taps"].shape[1])
    for i, (s, q) in enumerate(zip(samples, qs, strict=True)):
        qt = torch.from_numpy(q)
        t = len(s["input_ids"])
        out["embeds"][i, : len(q)] = s["embeds"][qt].float()
        out["final_q"][i, : len(q)] = s["final"][qt].float()
        out["mid_q"][i, : len(q)] = s["mid"][qt].float()
        out["loss_mask"][i, : len(q)] = s["loss_mask"][qt].float()
        out["q_valid"][i, : len(q)] = True
        out["q_pos"][i, : len(q)] = qt
        f = s["final"].float()
        out["feats"][i, :t] = f + feature_noise(f, noise)
        out["k_valid"][i, :t] = True
        out["resp"][i, s["prompt_len"]:t] = True
        if use_taps:
            tp = s["taps"].float()
            out["taps"][i, :t] = tp + feature_noise(tp, noise)
    return out


def _forward(draft: Draft, batch: dict, feats: torch.Tensor) -> dict:
    b, tq, _ = batch["embeds"].shape
    tk = feats.shape[1]
    causal = torch.tril(torch.ones(tq, tq, dtype=torch.bool))[None] & batch["q_valid"][:, None, :]
    causal = causal | torch.eye(tq, dtype=torch.bool)[None]  # padded queries see themselves (no empty rows)
    cross_mask = (torch.arange(tk)[None, None, :] < batch["q_pos"][:, :, None]) & batch["k_valid"][:, None, :]
    ck, cv = draft.cross_kv(feats)
    prev_idx = (batch["q_pos"] - 1).clamp(0, tk - 1)
    prev = torch.gather(feats, 1, prev_idx[..., None].expand(-1, -1, feats.shape[-1]))
    prev = prev * (batch["q_pos"] > 0)[..., None]
    pos = torch.arange(tq)[None].expand(b, -1)
    return draft(batch["embeds"], pos, causal, None, ck, cv, cross_mask, prev)


def _soft_ce(student_logits, teacher_logits, mask):
    t = torch.softmax(teacher_logits, -1)
    ce = -(t * torch.log_softmax(student_logits, -1)).sum(-1)
    return (ce * mask).sum() / mask.sum().clamp_min(1)


def _smooth_l1(a, b, mask):
    return (F.smooth_l1_loss(a, b, reduction="none").mean(-1) * mask).sum() / mask.sum().clamp_min(1)


def distill_loss(draft: Draft, batch: dict, feats: torch.Tensor, logits_of, tcfg: DraftTrainConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logit loss) of one `collate` batch whose cross-attention reads `feats` [B,T,F]: soft
    cross-entropy to the target's logits, feature and intermediate regression (DREAM's weights), and the
    self-feeding pass on the draft's own predicted features."""
    arch = draft.config.arch
    out = _forward(draft, batch, feats)
    mask = batch["loss_mask"]
    teacher = logits_of(batch["final_q"])
    loss_p = _soft_ce(logits_of(out["feature"]), teacher, mask)
    loss = tcfg.w_logits * loss_p
    if arch != "eagle3":
        loss = loss + tcfg.w_feature * _smooth_l1(out["feature"], batch["final_q"], mask)
    if arch == "dream" and tcfg.w_mid:
        loss = loss + tcfg.w_mid * _smooth_l1(out["block0"], batch["mid_q"], mask)
    if tcfg.self_feed:
        # Replace answer-position features by the draft's own (detached) predictions, as in tree drafting.
        b_, tk, h_ = feats.shape
        pred = feats.new_zeros(b_, tk + 1, h_)  # one spare slot absorbs the padded queries
        idx = torch.where(batch["q_valid"], batch["q_pos"], torch.full_like(batch["q_pos"], tk))
        pred.scatter_(1, idx[..., None].expand(-1, -1, h_), out["feature"].detach())
        feats2 = torch.where(batch["resp"][..., None], pred[:, :tk], feats)
        out2 = _forward(draft, batch, feats2)
        loss = loss + tcfg.w_logits * _soft_ce(logits_of(out2["feature"]), teacher, mask)
    return loss, loss_p


def _ckpt_path(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.with_name(f".{out.name}.resume.pt")


def train_draft(data_dir: str | Path | FeatureDataset, lm_head_weight: torch.Tensor, cfg: DraftConfig, tcfg: DraftTrainConfig,
                out_dir: str | Path | None = None, log=print, progress: bool = True,
                holdout: int = 64, resume: bool = False, ckpt_every: int = 500,
                draft: torch.nn.Module | None = None) -> tuple[Draft, dict]:
    """Train a draft on a feature directory; save (atomically) to `out_dir` when given.

    `draft`: a draft built elsewhere with the DREAM draft's call signature (a self-spec draft, built
    around the target's layers); only its parameters that require gradients are trained.

    The last `holdout` samples are kept out of training and report top-1 agreement with the target; a data
    set of at most twice that many is trained on whole and its training samples report it.
    With `out_dir`, a resume checkpoint (weights, optimiser, RNG, history) is written beside it every
    `ckpt_every` steps; `resume=True` continues an interrupted run from it and reproduces the run an
    uninterrupted one would have made.
    """
    torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    rng = random.Random(tcfg.seed)
    ds = data_dir if isinstance(data_dir, FeatureDataset) else FeatureDataset(data_dir)
    use_taps = cfg.arch == "eagle3"
    if use_taps and not ds.meta["config"].get("taps"):
        raise IncompatibleArtifactError(f"{data_dir} has no layer taps; generate data with taps for --arch eagle3")
    # a data set not more than twice the holdout (a few images) trains on all of it rather than on one
    # sample, and then reports top-1 on the training samples instead
    n_train = len(ds) - holdout if len(ds) > 2 * holdout else len(ds)
    eval_rows = range(n_train, len(ds)) if n_train < len(ds) else range(len(ds))
    if draft is None:
        draft = Draft(cfg)
        init_weights(draft)
    head = lm_head_weight.detach().float()
    logits_of = lambda x: soft_cap(x @ head.T, cfg.final_logit_softcapping)  # noqa: E731
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=0.0)
    t0 = time.time()
    history = []
    start = 0
    ckpt = _ckpt_path(out_dir) if out_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)  # OUT's parent may not exist before the draft is saved
    identity = {"draft_config": asdict(cfg), "train_config": asdict(tcfg), "data": ds.meta}
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if json.dumps(state["identity"], sort_keys=True, default=str) != json.dumps(identity, sort_keys=True,
                                                                                   default=str):
            raise IncompatibleArtifactError(f"{ckpt} belongs to a different draft, recipe or data; "
                                            "remove it or train without --resume")
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
        log(f"resuming from step {start}")
    from tqdm import tqdm

    bar = tqdm(range(start, tcfg.steps), desc=f"train {cfg.arch} draft", disable=not progress, mininterval=5,
               initial=start, total=tcfg.steps)
    for step in bar:
        draft.train()
        batch = collate([ds[rng.randrange(n_train)] for _ in range(tcfg.batch_size)], draft, tcfg.vtc_keep,
                        tcfg.noise, use_taps)
        feats = draft.target_feature(batch["feats"], [batch["taps"]] if use_taps else None)
        loss, loss_p = distill_loss(draft, batch, feats, logits_of, tcfg)
        for g in opt.param_groups:
            g["lr"] = _lr(step, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        if step % 50 == 0 and progress:
            bar.set_postfix(loss=f"{loss.item():.3f}", p=f"{loss_p.item():.3f}")
        if (step + 1) % 500 == 0 or step + 1 == tcfg.steps:
            acc = top1_agreement(draft, ds, eval_rows, logits_of, use_taps)
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "top1": round(acc, 4),
                            "minutes": round((time.time() - t0) / 60, 2)})
            log(json.dumps(history[-1]))
        if ckpt is not None and (step + 1) % ckpt_every == 0 and step + 1 < tcfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"identity": identity, "step": step + 1, "draft": draft.state_dict(), "opt": opt.state_dict(),
                        "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "history": history}, tmp)
            tmp.replace(ckpt)
    draft.eval()
    record = {"draft_config": asdict(cfg), "train_config": asdict(tcfg), "data": ds.meta, "history": history,
              "train_minutes": round((time.time() - t0) / 60, 2), "samples": len(ds)}
    if out_dir is not None:
        save_draft(draft, out_dir, record)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
    return draft, record


@torch.no_grad()
def top1_agreement(draft: Draft, ds: FeatureDataset, indices, logits_of, use_taps: bool) -> float:
    """Share of answer positions where the draft's argmax equals the target's (teacher-forced)."""
    draft.eval()
    hit = tot = 0.0
    for i in indices:
        batch = collate([ds[i]], draft, None, 0.0, use_taps)
        feats = draft.target_feature(batch["feats"], [batch["taps"]] if use_taps else None)
        out = _forward(draft, batch, feats)
        m = batch["loss_mask"][0].bool()
        a = logits_of(out["feature"][0][m]).argmax(-1)
        b = logits_of(batch["final_q"][0][m]).argmax(-1)
        hit += float((a == b).sum())
        tot += float(m.sum())
    return hit / max(tot, 1.0)


def save_draft(draft: Draft, out_dir: str | Path, record: dict, extra_files: dict[str, str] | None = None) -> None:
    """Write weights (safetensors), draft_config.json, training.json (and `extra_files`: name → text) atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        draft.config.save(tmp)
        (Path(tmp) / "training.json").write_text(json.dumps(record, indent=2))
        for name, text in (extra_files or {}).items():
            (Path(tmp) / name).write_text(text)


def load_draft_config(path: str | Path) -> DraftConfig:
    """The `draft_config.json` of draft directory `path` (a clear error when it is not one)."""
    if not (Path(path) / "draft_config.json").exists():
        raise IncompatibleArtifactError(f"{path} is not a draft directory (draft_config.json missing)")
    return DraftConfig.load(path)


def load_draft(path: str | Path, target=None) -> Draft:
    """Load a draft saved by `save_draft` (or converted from an upstream checkpoint).

    `target`: the loaded target (`draft.target.Target`), which a self-spec draft needs (it runs the
    target's first layers); other drafts ignore it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = load_draft_config(path)
    if cfg.arch == "self-spec":
        from dream_export.draft.selfspec import load_selfspec

        return load_selfspec(path, cfg, None if target is None else target.side.decoder)
    draft = Draft(cfg)
    missing, unexpected = draft.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise IncompatibleArtifactError(f"{path}: weights do not match the config (missing {missing[:3]}, "
                                        f"unexpected {unexpected[:3]})")
    draft.eval()
    return draft
