"""torch.compile on CPU for the model's matrix products (the 120 layer GEMMs of SmolLM2-135M, random float32 weights,
each with its own weights so they stream from memory): eager F.linear against inductor with freezing, by default and
with max-autotune (CPP GEMM template vs MKL). One row and sixteen rows; prints ms per chain and the compile time.

    python benchmarks/profile/compile_chain.py default
    python benchmarks/profile/compile_chain.py autotune

Measured here (session 2, 2 threads, idle): default: eager 39.1 / 71.2 ms (1 / 16 rows), compiled 29.7 / 93.8, 49 s
to compile and run; autotune: eager 43.1 / 103.9, compiled 17.7 / 49.0, 159 s. Not used by the lean forward yet: every
new shape (tokens per pass, rows, cache length) compiles again.
"""
import time, statistics, sys, torch
torch.manual_seed(0)
SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 576)]
L = 30
W = [[torch.randn(n, k) for k, n in SHAPES] for _ in range(L)]
class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for layer in W for w in layer])
    def forward(self, x576, x1536):
        outs = []
        for i, w in enumerate(self.ws):
            x = x1536 if w.shape[1] == 1536 else x576
            outs.append(torch.nn.functional.linear(x, w).sum())
        return torch.stack(outs).sum()
m = Chain().eval()
def bench(f, M, reps=7):
    a, b = torch.randn(M, 576), torch.randn(M, 1536)
    for _ in range(2): f(a, b)
    ts = []
    for _ in range(reps):
        s = time.perf_counter(); f(a, b); ts.append(time.perf_counter() - s)
    return 1000 * statistics.median(ts)
mode = sys.argv[1]
import torch._inductor.config as cfg
cfg.freezing = True
if mode == "autotune":
    cfg.max_autotune = True; cfg.max_autotune_gemm_backends = "CPP,ATEN"
with torch.inference_mode():
    eager = {M: bench(m, M) for M in (1, 16)}
    t = time.time()
    cm = torch.compile(m, dynamic=False)
    res = {M: bench(cm, M) for M in (1, 16)}
    print(mode, "eager", {k: round(v, 1) for k, v in eager.items()}, "compiled", {k: round(v, 1) for k, v in res.items()}, "compile+run s", round(time.time() - t), flush=True)
