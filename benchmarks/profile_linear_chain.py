"""Where a wide float32 forward goes on this CPU: the model's matrix products alone, with cold weights.

Runs the 121 linear layers of SmolLM2-135M (30 x [QKV, gate-up, down, out] + the 49152-token head)
on random weights of the same shapes, M rows at a time, through three kernels: oneDNN-prepacked
(what the lean forward uses), torch.mm on a transposed copy, and F.linear. Every layer has its own
weights (540 MB in all), so they stream from memory as in the model; a microbenchmark that reuses
one matrix keeps it in cache and flatters wide products. Prints the median ms of the whole chain.

    python benchmarks/profile_linear_chain.py [--threads 2] [--reps 7]
"""

import argparse
import statistics
import time

import torch

SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 576)]  # (in, out): fused QKV, fused gate-up, down, out
LAYERS, VOCAB = 30, 49152


def chain_ms(pack, apply, weights, head, rows: int, reps: int) -> float:
    packed = [[pack(w) for w in layer] for layer in weights]
    head_p = pack(head)
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    times = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        for layer in packed:
            for (k, _), w in zip(SHAPES, layer):
                apply(xs[k], w)
        apply(xs[576], head_p)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [[torch.randn(n, k) for k, n in SHAPES] for _ in range(LAYERS)]
    head = torch.randn(VOCAB, 576)
    kernels = {
        "onednn": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None),
                   lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
        "mm": (lambda w: w.t().contiguous(), torch.mm),
        "linear": (lambda w: w, torch.nn.functional.linear),
    }
    print(f"ms for the 121 linear layers of SmolLM2-135M, float32, {args.threads} threads, median of {args.reps}")
    print(f"{'rows':>5} " + " ".join(f"{k:>8}" for k in kernels))
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32):
            ms = [chain_ms(p, a, weights, head, rows, args.reps) for p, a in kernels.values()]
            print(f"{rows:>5} " + " ".join(f"{v:8.1f}" for v in ms), flush=True)


if __name__ == "__main__":
    main()
