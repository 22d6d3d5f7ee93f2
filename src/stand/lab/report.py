"""`stand bench` rows on file and on screen: JSON, a rich table, a markdown table.

    python -m stand.lab.report RESULTS.json    # the rows as a markdown table
"""

from __future__ import annotations

import sys

from stand.core import files
from stand.errors import StandError


def write_rows(rows: list[dict], path: str) -> None:
    """A list of rows, one per variant (each row carries its configuration)."""
    files.write_json(path, rows, indent=2)


def read_rows(path: str) -> list[dict]:
    rows = files.read_json(path, "bench results")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
        raise StandError(f"{path} is not a `stand bench --json` file (a list of rows)")
    return rows


def _fmt(r: dict, c: str) -> str:
    v = r.get(c)
    if v is None:
        return "-"
    if c == "tok_per_s":
        spread = f" [{r['tok_per_s_min']:.1f}-{r['tok_per_s_max']:.1f}]" if r.get("repeats", 1) > 1 else ""
        return f"{v:.1f}{spread}"
    if c.startswith("speedup"):
        return f"{v:.2f}x"
    if c == "draft_share":
        return f"{100 * v:.1f}%"
    if c == "table_bytes":
        return f"{v / 2**20:.2f}"
    if c == "accuracy":
        return f"{100 * v:.0f}%"
    return str(v)


SCREEN = (("method", "method"), ("n", "n"), ("schedule", "schedule"), ("new_tokens", "tokens"),
          ("seconds", "s"), ("tok_per_s", "tok/s"), ("speedup_vs_none", "x none"), ("speedup_vs_hf", "x hf"),
          ("speedup_vs_vllm", "x vllm"), ("mean_accepted", "tok/step"), ("nodes_per_step", "nodes/step"), ("draft_share", "drafting"), ("table_bytes", "table MiB"),
          ("accuracy", "accuracy"))
MARKDOWN = (("method", "method"), ("n", "n"), ("schedule", "schedule"), ("tok_per_s", "tok/s"),
            ("speedup_vs_none", "x none"), ("speedup_vs_hf", "x hf"), ("speedup_vs_vllm", "x vllm"),
            ("mean_accepted", "tokens/step"), ("nodes_per_step", "nodes/step"),
            ("draft_share", "drafting"), ("table_bytes", "table MiB"), ("accuracy", "accuracy"))


def fastest_first(rows: list[dict]) -> list[dict]:
    """Rows by n, the fastest first within each n."""
    return sorted(rows, key=lambda r: (r["n"], -r["tok_per_s"]))


def title(rows: list[dict]) -> str:
    if not rows:
        return "no finished rows"
    r0 = rows[0]
    return (f"{r0.get('dataset')}, {r0.get('problems')} problems x {r0.get('repeats')} repeats, "
            f"T={r0.get('temperature')}, {r0.get('max_new_tokens')} new tokens, {r0.get('dtype')}, "
            f"{r0.get('model')} on {r0.get('backend', 'torch')}" + (" (INTERRUPTED: partial)" if r0.get("interrupted") else ""))


def rich_table(rows: list[dict]):
    """The rows as a rich Table (fastest first within each n)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title(rows)))
    for key, head in SCREEN:
        table.add_column(head, justify="left" if key == "method" else "right")
    for r in fastest_first(rows):
        table.add_row(*[escape(_fmt(r, key)) for key, _ in SCREEN])  # a method's options are in [brackets]
    return table


def markdown_table(rows: list[dict]) -> str:
    """The rows as a GitHub markdown table (fastest first within each n), for the docs."""
    lines = ["| " + " | ".join(h for _, h in MARKDOWN) + " |", "|" + "---|" * len(MARKDOWN)]
    for r in fastest_first(rows):
        lines.append("| " + " | ".join(_fmt(r, k) for k, _ in MARKDOWN) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m stand.lab.report RESULTS.json")
    try:
        print(markdown_table(read_rows(argv[0])))
    except StandError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
