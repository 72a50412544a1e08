"""Click parameter types and options shared by the commands (`cli.py`, `calib/command.py`)."""

from __future__ import annotations

import click

from dream_export.runtime.tree import TreeSpec

# what a target's weights may load as: "auto" keeps the checkpoint's own dtype (its config's `dtype`)
LOAD_DTYPES = ("auto", "float32", "float16", "bfloat16")

# The EAGLE-2 paper's tree (top-4 per node, depth 6, 32 verified nodes): the dataclass defaults.
DEFAULT_TREE = TreeSpec()


def tree_text(spec: TreeSpec) -> str:
    """'K,DEPTH,TOTAL', as the command line takes it."""
    return f"{spec.k},{spec.depth},{spec.total}"


class TreeSpecType(click.ParamType):
    """'K,DEPTH,TOTAL' → `TreeSpec`; a malformed or impossible shape is a usage error naming the option."""

    name = "K,DEPTH,TOTAL"

    def convert(self, value, param, ctx) -> TreeSpec:
        if isinstance(value, TreeSpec):
            return value
        try:
            return TreeSpec.parse(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


TREE_SPEC = TreeSpecType()


def tree_option(*decls: str, help: str = "K,DEPTH,TOTAL of the speculation tree.", default: TreeSpec | None = DEFAULT_TREE,
                **kwargs):
    """A `--tree`-style option that hands the command a `TreeSpec` (default: `DEFAULT_TREE`; None: the
    command resolves it, e.g. from a searched bundle's chosen shape)."""
    return click.option(*(decls or ("--tree",)), type=TREE_SPEC, default=default,
                        show_default=tree_text(default) if default else False, help=help, **kwargs)


def vtc_score_option(f):
    """`--vtc-score`: how visual-token compression ranks image tokens (runtime.vtc.VTC_SCORES)."""
    return click.option("--vtc-score", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
                        help="Image-token score for --vtc-keep: DREAM's mean attention received in the target's "
                             "last layer (mean) or DREAM-S's highest attention any query gives (max).")(f)
