"""One-token int4 passes of the default model with a float32 KV cache (the forward's own) against a bfloat16 one,
alternated in one process so that both see the same machine: for each context length, `rounds` rounds of
`passes` passes per cache, the median over rounds of each round's fastest pass. Prints one line per length (ms)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stand.backends.int4 import load_int4
from stand.backends.load import default_model_path

CACHES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def filled(model, dtype: torch.dtype, length: int):
    model.cache_dtype = dtype
    cache = model.new_cache()
    model.forward(cache, torch.randint(0, 1000, (1, length)), torch.arange(length)[None], None, keep_last=1)
    return cache


def fastest_pass(model, cache, passes: int) -> float:
    ids, best = torch.tensor([[5]]), float("inf")
    for _ in range(passes):
        at = cache.length
        start = time.perf_counter()
        model.forward(cache, ids, torch.tensor([[at]]), None)
        best = min(best, time.perf_counter() - start)
        cache.length = at  # the same position again: the cache does not grow
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="300,600,1000")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--passes", type=int, default=10)
    args = ap.parse_args()
    model = load_int4(default_model_path()).lean
    for length in map(int, args.lengths.split(",")):
        caches = {name: filled(model, dtype, length) for name, dtype in CACHES.items()}
        times = {name: [] for name in CACHES}
        for _ in range(args.rounds):
            for name, cache in caches.items():
                model.cache_dtype = CACHES[name]
                times[name].append(fastest_pass(model, cache, args.passes))
        print(f"{length} cached tokens: " + ", ".join(
            f"{name} cache {1000 * statistics.median(t):.2f} ms" for name, t in times.items()))


if __name__ == "__main__":
    main()
