"""Command-line pieces of the DREAM-S supernet: `train-draft --supernet` and `export --subnet`."""

from __future__ import annotations

from pathlib import Path

import click


def supernet_options(f):
    """`train-draft`'s supernet options."""
    for opt in reversed([
        click.option("--supernet", is_flag=True,
                     help="Train a DREAM-S supernet: elastic last-block heads, visual keep ratio and injected "
                          "target layer (one of the last five; the features carry those layers)."),
        click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="With --supernet: start from this full DREAM draft instead of a phase 1 of --steps."),
        click.option("--supernet-steps", default=1000, show_default=True,
                     help="With --supernet: phase-2 steps (one random sub-network each)."),
    ]):
        f = opt(f)
    return f


def supernet_taps(text_cfg, arch: str, no_cross: bool) -> tuple[int, ...]:
    """The target layers a supernet's features carry (the last five but the final one), after checking
    that the draft can be one."""
    from dream_export.draft.supernet import last_layers
    from dream_export.errors import UsageError

    if arch != "dream" or no_cross:
        raise UsageError("--supernet trains a DREAM draft (with cross-attention): drop --arch/--no-cross")
    return tuple(last_layers(text_cfg.num_hidden_layers)[:-1])


def train_supernet_cmd(target, feat_dir: Path, cfg, tcfg, init: Path | None, supernet_steps: int, out: Path,
                       log) -> None:
    """Run both phases (phase 1: `tcfg.steps`, skipped with `init`) and save the supernet to `out`."""
    from dream_export.draft.supernet import SupernetTrainConfig, train_supernet

    scfg = SupernetTrainConfig(phase1_steps=0 if init else tcfg.steps, phase2_steps=supernet_steps, seed=tcfg.seed)
    dec = target.side.decoder
    _, spec = train_supernet(feat_dir, target.model.lm_head.weight, dec.lm.norm, dec.n_layers, cfg, tcfg, scfg,
                             init=init, out_dir=out, log=log)
    log(f"saved supernet draft to {out} ({spec.training['minutes']} min; head order {spec.head_order}, "
        f"layers {spec.layers})")


def subnet_option(f):
    """`export`'s choice of a supernet's sub-network."""
    return click.option(
        "--subnet", default=None, metavar="heads=N,vtc_keep=R,layer=L",
        help="With a supernet draft: export only this sub-network (its last block's heads physically pruned; "
             "heads may be a keep ratio such as 0.5; omitted knobs stay full). Without it, a supernet exports "
             "every head variant for `dream-export search`.")(f)


def subnet_draft_dir(out: Path, draft_dir: Path, subnet: str | None) -> Path:
    """The draft a bundle's graphs were made from (a sub-network's pruned draft is saved in the bundle)."""
    from dream_export.export.subnet import SUBNET_DRAFT_DIR

    return out / SUBNET_DRAFT_DIR if subnet else draft_dir
