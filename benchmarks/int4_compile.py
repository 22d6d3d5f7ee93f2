"""torch.compile (inductor, CPU) on the int4 forward's passes: what it would save, and what it costs to compile.

The default model's int4 weights (the GGUF file's own blocks, as `--dtype int4` loads them) run through a copy of the
int4 layer written for inductor (rotary embedding in real arithmetic: inductor has no code for complex products; the
cache as one tensor per layer, written at slot S; attention by the product's own `grouped_attention`), eager and
compiled: the 30 layers as one graph (weights as graph constants), or groups of G layers as one graph that every
group reuses (weights as its inputs). The head and the embedding run eager in every variant, as in the product.
Prints and writes (--json) ms per pass at C cached tokens for 1, 4 and 8 new tokens (median of --reps after a
warm-up), and the seconds each variant spent on its first call of each kind of pass (compiling). Each variant runs in
a process of its own with an empty inductor cache, so compile times are cold ones:

    python benchmarks/int4_compile.py --json benchmarks/results/int4_compile/passes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("eager", "whole", "group5", "group10")


def layer_fn(cfg, x, w, cos, sin, keys, values, S: int, mask):
    """One int4 layer for one row: x [T, hidden] float32; w: (ln1, ln2, then packed codes and scales-zeros of qkv,
    o, gate-up, down); cos, sin [T, 1, D/2]; keys, values [Hkv, capacity, D] float32, written at [S, S + T)."""
    import torch
    import torch.nn.functional as F

    from stand.backends.lean import grouped_attention

    H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    T = x.shape[0]
    ln1, ln2, qkv_w, qkv_sz, o_w, o_sz, gu_w, gu_sz, d_w, d_sz = w
    mm = lambda a, p, sz, n: torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16), p, 32, sz)[:, :n]
    qkv = mm(F.rms_norm(x, (cfg.hidden,), ln1, cfg.eps), qkv_w, qkv_sz, (H + 2 * Hkv) * D).float()
    pairs = qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    qk = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).view(T, H + Hkv, D)
    keys[:, S:S + T] = qk[:, H:].transpose(0, 1)
    values[:, S:S + T] = qkv[:, (H + Hkv) * D:].view(T, Hkv, D).transpose(0, 1)
    out = grouped_attention(qk[None, :, :H], keys[None, :, : S + T], values[None, :, : S + T],
                            None if mask is None else mask[None, None], D ** -0.5)  # [1, T, H D], as int4_model.py
    x = x + mm(out[0], o_w, o_sz, cfg.hidden).float()
    gate, up = mm(F.rms_norm(x, (cfg.hidden,), ln2, cfg.eps), gu_w, gu_sz, 2 * cfg.intermediate).chunk(2, dim=-1)
    return x + mm(F.silu(gate) * up, d_w, d_sz, cfg.hidden).float()


def run_variant(variant: str, cache_len: int, reps: int) -> dict:
    import torch

    from stand.backends.int4 import load_int4
    from stand.backends.load import default_model_path

    lean = load_int4(default_model_path()).lean
    cfg = lean.cfg
    weights = [(l.ln1, l.ln2, l.qkv.packed, l.qkv.scales_zeros, l.o.packed, l.o.scales_zeros, l.gate_up.packed,
                l.gate_up.scales_zeros, l.down.packed, l.down.scales_zeros) for l in lean.layers]
    keys = [torch.zeros(cfg.kv_heads, cache_len + 64, cfg.head_dim) for _ in weights]
    values = [torch.zeros_like(k) for k in keys]
    cos, sin = lean.cis.real.contiguous(), lean.cis.imag.contiguous()

    def group(x, cs, sn, S: int, mask, w, kv):
        for wi, (k, v) in zip(w, kv):
            x = layer_fn(cfg, x, wi, cs, sn, k, v, S, mask)
        return x

    def whole(x, cs, sn, S: int, mask):
        for i, wi in enumerate(weights):
            x = layer_fn(cfg, x, wi, cs, sn, keys[i], values[i], S, mask)
        return x

    size = {"whole": len(weights), "group5": 5, "group10": 10}.get(variant, len(weights))
    fn = torch.compile(whole if variant == "whole" else group, dynamic=True) if variant != "eager" else group
    kv = list(zip(keys, values))

    def layers(x, cs, sn, S, mask):
        if variant == "whole":
            return fn(x, cs, sn, S, mask)
        for lo in range(0, len(weights), size):
            x = fn(x, cs, sn, S, mask, tuple(weights[lo:lo + size]), tuple(kv[lo:lo + size]))
        return x

    def forward(ids, S: int, mask):
        T = ids.shape[0]
        p = torch.arange(S, S + T)
        x = layers(lean.embed(ids), cos[p][:, None], sin[p][:, None], S, mask)
        return lean.lm_head(lean.final_norm(x))

    out, first = {}, {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        forward(torch.randint(0, 5000, (cache_len,)), 0, torch.ones(cache_len, cache_len, dtype=torch.bool).tril())
        first["prompt"] = time.perf_counter() - t0
        for T in (1, 4, 8):
            step = lambda: forward(torch.randint(0, 5000, (T,)), cache_len,
                                   None if T == 1 else torch.ones(T, cache_len + T, dtype=torch.bool))
            t0 = time.perf_counter()
            step()
            first[f"T={T}"] = time.perf_counter() - t0
            for _ in range(5):
                step()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out[T] = 1000 * statistics.median(times)
    return {"variant": variant, "ms": out, "first_call_s": first, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-len", type=int, default=500)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process, print its JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.cache_len, args.reps)))
        return
    rows = []
    for v in args.variants.split(","):
        with tempfile.TemporaryDirectory() as cache:  # cold: an empty inductor cache per variant
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run([sys.executable, __file__, "--one", v, "--cache-len", str(args.cache_len),
                                   "--reps", str(args.reps)], env=env, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        ms = ", ".join(f"{t} tokens {m:.2f} ms" for t, m in row["ms"].items())
        first = ", ".join(f"{k} {s:.0f} s" for k, s in row["first_call_s"].items())
        print(f"{v:8s} {ms}; first calls: {first}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"cache_len": args.cache_len, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
