"""torch.compile on CPU for the model's matrix products: the 120 layer GEMMs of SmolLM2-135M (random float32 weights,
each layer its own, so they stream from memory as in the model), eager F.linear against inductor with freezing, by
default or with max-autotune (its CPP GEMM template beside ATen). One row and sixteen rows; prints ms per chain and
the seconds spent compiling and running.

    python benchmarks/profile_compile.py --mode default
    python benchmarks/profile_compile.py --mode autotune
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 576)]  # (in, out): fused QKV, fused gate-up, down, out
LAYERS = 30


class Chain(torch.nn.Module):
    """Every layer's product on its own input width; the outputs summed so none is optimised away."""

    def __init__(self):
        super().__init__()
        weights = [torch.randn(n, k) for _ in range(LAYERS) for k, n in SHAPES]
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w in weights])

    def forward(self, x576: torch.Tensor, x1536: torch.Tensor) -> torch.Tensor:  # [M, 576], [M, 1536] -> []
        outs = [torch.nn.functional.linear(x1536 if w.shape[1] == 1536 else x576, w).sum() for w in self.ws]
        return torch.stack(outs).sum()


def median_ms(f, rows: int, reps: int) -> float:
    a, b = torch.randn(rows, 576), torch.randn(rows, 1536)
    for _ in range(2):
        f(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("default", "autotune"), default="default")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import torch._inductor.config as inductor

    torch.manual_seed(0)
    inductor.freezing = True
    if args.mode == "autotune":
        inductor.max_autotune = True
        inductor.max_autotune_gemm_backends = "CPP,ATEN"
    model = Chain().eval()
    with torch.inference_mode():
        eager = {rows: median_ms(model, rows, args.reps) for rows in (1, 16)}
        t = time.time()
        compiled = torch.compile(model, dynamic=False)
        fast = {rows: median_ms(compiled, rows, args.reps) for rows in (1, 16)}
    print(f"{args.mode}: eager {eager[1]:.1f} / {eager[16]:.1f} ms (1 / 16 rows), compiled {fast[1]:.1f} / "
          f"{fast[16]:.1f} ms, compile and run {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
