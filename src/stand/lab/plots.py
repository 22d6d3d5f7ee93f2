"""PNG figures from `stand bench` rows (matplotlib, Agg backend: no display needed).

    python -m stand.lab.plots results.json [more.json ...] OUT_DIR
"""

from __future__ import annotations

import os
import sys

from stand.core.sequence import mean_accepted
from stand.errors import StandError
from stand.lab.report import read_rows

SWEEP_NS = (1, 2, 4, 8, 16)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(r: dict) -> str:
    """Method with its schedule where that distinguishes rows (n > 1, ours)."""
    return r["method"] + (f" ({r['schedule'][:3]})" if r["n"] > 1 and r["schedule"] not in ("hf", "llama.cpp", "batched") else "")


def _title(rows: list[dict], what: str) -> str:
    r = rows[0]
    return (f"{what}\n{r.get('model')}, {r.get('dataset')} x{r.get('problems')}, T={r.get('temperature')}, "
            f"{r.get('max_new_tokens')} tokens, {r.get('dtype')}")


def _bars(rows: list[dict], value, ylabel: str, what: str, path: str, errors=None) -> str:
    """Grouped bars: one group per n, one bar per method (and schedule)."""
    plt = _plt()
    ns = sorted({r["n"] for r in rows})
    names = list(dict.fromkeys(_name(r) for r in rows))
    width = 0.8 / max(len(ns), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    for j, n in enumerate(ns):
        by = {_name(r): r for r in rows if r["n"] == n}
        xs = [i + (j - (len(ns) - 1) / 2) * width for i, nm in enumerate(names) if nm in by and value(by[nm]) is not None]
        got = [by[nm] for nm in names if nm in by and value(by[nm]) is not None]
        yerr = None
        if errors is not None and got:
            yerr = [[value(r) - errors(r)[0] for r in got], [errors(r)[1] - value(r) for r in got]]
        ax.bar(xs, [value(r) for r in got], width, yerr=yerr, capsize=3, label=f"n={n}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(rows, what), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(ns) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tok_per_s(rows: list[dict], path: str) -> str:
    return _bars(rows, lambda r: r["tok_per_s"], "tokens / s (median; bars: min-max over repeats)",
                 "Throughput by method", path, errors=lambda r: (r["tok_per_s_min"], r["tok_per_s_max"]))


def accepted(rows: list[dict], path: str) -> str:
    return _bars(rows, lambda r: r.get("mean_accepted"), "tokens per verification pass (per sample)",
                 "Accepted tokens by method", path)


def speedup_vs_n(rows: list[dict], path: str) -> str:
    """Speed-up over plain decoding (`none`, same n) against N, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(_name(r) for r in rows):
        pts = sorted((r["n"], r["speedup_vs_none"]) for r in rows if _name(r) == name and r.get("speedup_vs_none"))
        if pts:
            ax.plot([n for n, _ in pts], [s for _, s in pts], marker="o", label=name)
    ns = sorted({r["n"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("speed-up over plain decoding (same N)")
    ax.set_title(_title(rows, "Speed-up against N"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def acceptance_cdf(rows: list[dict], path: str) -> str:
    """Per method, the share of verification steps that committed at least k tokens (k = 1, 2, ...)."""
    plt = _plt()
    ns = sorted({r["n"] for r in rows if r.get("accept_counts")})
    fig, axes = plt.subplots(1, max(len(ns), 1), figsize=(5.2 * max(len(ns), 1), 4.2), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for r in rows:
            counts = r.get("accept_counts")
            if r["n"] != n or not counts or sum(counts) == 0:
                continue
            total = sum(counts)
            ks = list(range(1, len(counts) + 1))  # the last point (0 steps commit that many) closes the curve
            mean = mean_accepted(sum(k * c for k, c in enumerate(counts)), total)
            ax.plot(ks, [sum(counts[k:]) / total for k in ks], marker=".", label=f"{_name(r)} (mean {mean:.2f})")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("k: tokens committed in one verification step")
        ax.set_ylabel("share of steps committing >= k tokens")
        ax.set_title(f"n={n}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(rows, "Acceptance length per step"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(rows: list[dict], out_dir: str) -> list[str]:
    """Every figure that the rows support; returns the paths written."""
    if not rows:
        return []
    os.makedirs(out_dir, exist_ok=True)
    out = [tok_per_s(rows, os.path.join(out_dir, "tok_per_s.png")),
           accepted(rows, os.path.join(out_dir, "accepted.png"))]
    if any(r.get("speedup_vs_none") for r in rows):
        out.append(speedup_vs_n(rows, os.path.join(out_dir, "speedup_vs_n.png")))
    if any(r.get("accept_counts") for r in rows):
        out.append(acceptance_cdf(rows, os.path.join(out_dir, "acceptance.png")))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python -m stand.lab.plots RESULTS.json [MORE.json ...] OUT_DIR")
    try:
        rows = [r for path in argv[:-1] for r in read_rows(path)]
        for p in plot_all(rows, argv[-1]):
            print(p)
    except StandError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
