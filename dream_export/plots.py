"""The commands' figures (matplotlib, from the `export` extra), imported only when a plot is asked for:
the runtime never loads matplotlib."""

from __future__ import annotations

from pathlib import Path

from dream_export.errors import UsageError


def _pyplot(option: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError(f"{option} needs matplotlib: pip install 'dream-export[export]'") from e
    return plt


def bench_plot(summary: dict, path: str | Path) -> None:
    """`bench --plot`: acceptance-length histogram and speculative time split of a bench summary."""
    plt = _pyplot("--plot")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    hist = summary["accept_histogram"]
    a.bar(range(len(hist)), hist, color="#4477aa")
    a.set_xlabel("tokens gained per target pass")
    a.set_ylabel("rounds")
    a.set_title(f"acceptance (τ = {summary['tau']:.2f})")
    split = summary["time_split_seconds"]
    b.barh(list(split), list(split.values()), color="#cc6677")
    b.set_xlabel("seconds (all prompts)")
    b.set_title(f"speculative time split, speedup {summary['speedup']:.2f}×")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_plot(components: dict[str, list[dict]], compare: dict | None, path: str | Path) -> None:
    """`profile`: per graph the ten op types taking the most time per call, and the latency model's
    predicted vs measured call times when `compare` is given."""
    plt = _pyplot("the profile plot")
    panels = len(components) + (compare is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for ax, (c, rows) in zip(axes[0], components.items(), strict=False):
        by_op: dict[str, float] = {}
        for r in rows:
            by_op[r["op_type"] or "?"] = by_op.get(r["op_type"] or "?", 0.0) + r["time_ms"]
        ops = sorted(by_op.items(), key=lambda kv: kv[1])[-10:]
        ax.barh([o for o, _ in ops], [t for _, t in ops], color="#4477aa")
        ax.set_title(f"{c}: time per call by op (ms)")
    if compare is not None:
        from dream_export.targets.latency_report import plot_compare

        plot_compare(axes[0][-1], compare)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def search_plot(result: dict, path: str | Path) -> None:
    """`search --plot`: τ against a round's cost of every measured configuration, the front and the choice."""
    plt = _pyplot("--plot")
    fig, ax = plt.subplots(figsize=(7, 5))
    rows, front = result["all"], result["front"]
    ax.scatter([r["round_cost"] for r in rows], [r["tau"] for r in rows], s=14, color="#bbbbbb", label="measured")
    ax.plot([r["round_cost"] for r in front], [r["tau"] for r in front], "o-", color="#4477aa", label="Pareto front")
    for key, colour in (("full", "#228833"), ("chosen", "#cc6677")):
        r = result[key]
        ax.scatter([r["round_cost"]], [r["tau"]], s=80, marker="*", color=colour,
                   label=f"{key}: {r['label']} ({r['speedup']:.2f}×)")
    ax.set_xlabel("a round's time (draft + verify) in autoregressive steps")
    ax.set_ylabel("τ (tokens per target pass)")
    ax.set_title(f"supernet search on {result['target']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
