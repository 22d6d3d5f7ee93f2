"""Where a forward's time goes: torch.profiler op tables for one plain step and one 16-node verification step, our
lean forward beside the Hugging Face one, on the default model over a 500-token cache (5 forwards each).

    python benchmarks/profile_ops.py --dtype float32 --out ops.txt
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from stand.backends.load import load_model
from stand.lab.profile import Probe, profile_targets


@torch.inference_mode()
def op_table(target, nodes: int, reps: int = 5, rows: int = 12) -> str:
    """The profiler's table (most self time first) over `reps` forwards of `nodes` new tokens, after two untimed."""
    probe = Probe(target, 1, 500)
    for _ in range(2):
        probe.time_ms(nodes)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ms = sorted(probe.time_ms(nodes) for _ in range(reps))
    head = f"forward ms (sorted): {', '.join(f'{m:.1f}' for m in ms)}\n"
    return head + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", help="bfloat16 | float32")
    ap.add_argument("--out", required=True, help="where to write the tables")
    args = ap.parse_args()
    targets = profile_targets(load_model(None, args.dtype, backend="torch", forward="hf"))
    with open(args.out, "w") as f:
        for nodes in (1, 16):
            for name, target in targets.items():
                f.write(f"\n=== {name}, {args.dtype}, {nodes} new token(s) over a 500-token cache ===\n")
                f.write(op_table(target, nodes))


if __name__ == "__main__":
    main()
