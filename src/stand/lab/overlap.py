"""How much the samples of one question repeat each other: what a table shared by them could at most find.

    python -m stand.lab.overlap --dataset champ --first 240 --problems 4 --n 8 --max-new-tokens 512

For every generated token y_t of every sample and its context c (the k-1 tokens before it), it asks where the k-gram
(c, y_t) was already written, so that a table could have learned it before the sample reached position t:
- own: the prompt or this sample's earlier tokens (one sample alone);
- lockstep: also the other samples' tokens before position t (the samples of one batch advance together);
- earlier: also every token of the samples before this one (the samples one after another);
- any: also every token of every other sample (the overlap between trajectories the STAND paper reports for bigrams).
A shared table can only gain where the second, third or fourth column exceeds the first. The samples come from plain
decoding (method none) on the chosen backend; the counting needs no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from stand.errors import StandError

KINDS = ("own", "lockstep", "earlier", "any")


@dataclass
class Seen:
    """Counts of generated k-grams found before their position, per kind of source (KINDS)."""
    total: int = 0
    own: int = 0
    lockstep: int = 0
    earlier: int = 0
    any: int = 0

    def add(self, other: "Seen") -> None:
        for name in ("total",) + KINDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def fractions(self) -> dict[str, float]:
        return {k: getattr(self, k) / max(self.total, 1) for k in KINDS}


def grams(tokens: list[int], k: int) -> list[tuple]:
    """[L] tokens -> the k-gram ending at each position t >= k-1 (L-k+1 tuples; entry i ends at token i+k-1)."""
    return [tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)]


def first_ends(gs: list[tuple], prompt_len: int, k: int) -> dict[tuple, int]:
    """The k-grams of prompt + sample (grams) -> the generated position where each first ends (negative: in the prompt)."""
    out: dict[tuple, int] = {}
    for i, g in enumerate(gs):
        out.setdefault(g, i + k - 1 - prompt_len)
    return out


def seen(prompt: list[int], samples: list[list[int]], k: int) -> Seen:
    """Where the k-grams ending at the generated tokens of each sample were written before (see the module)."""
    texts = [grams(prompt + s, k) for s in samples]  # per sample: entry i ends at token i+k-1 of prompt + sample
    firsts = [first_ends(gs, len(prompt), k) for gs in texts]
    counts = Seen()
    for j, gs in enumerate(texts):
        for i, g in enumerate(gs):
            t = i + k - 1 - len(prompt)  # the generated position the k-gram ends at
            if t < 0:
                continue
            others = [(o, f[g]) for o, f in enumerate(firsts) if o != j and g in f]
            own = firsts[j][g] < t
            counts.total += 1
            counts.own += own
            counts.lockstep += own or any(pos < t for _, pos in others)
            counts.earlier += own or any(o < j for o, _ in others)
            counts.any += own or bool(others)
    return counts


def measure(dataset: str, first: int, problems: int, n: int, max_new_tokens: int, temperature: float, seed: int,
            orders: tuple[int, ...], backend: str) -> dict[int, Seen]:
    """Samples n plain continuations of each problem and counts their k-grams for every k in orders."""
    from tqdm import tqdm

    from stand.api import encode_prompts, generate, resolve_target
    from stand.params import SamplingParams
    from stand.tts.problems import problem_range

    chosen = problem_range(dataset, first, problems)
    target = resolve_target(None, backend, "auto", "auto", "none")
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    out = {k: Seen() for k in orders}
    for p in tqdm(chosen, desc=f"{n} samples a problem", unit="problem", file=sys.stderr):
        prompt = encode_prompts(target, [p.prompt])[0]  # encoded once: the counts and the samples use these ids
        samples = [s.token_ids for s in generate([prompt], target, params=params, n=n)[0]]
        for k in orders:
            out[k].add(seen(prompt, samples, k))
    return out


def table(results: dict[int, Seen]) -> str:
    rows = ["| k-gram | tokens | own (alone) | lockstep (a batch) | earlier samples (one after another) | any other sample |",
            "|---|---|---|---|---|---|"]
    for k, s in sorted(results.items()):
        f = s.fractions()
        rows.append(f"| {k} | {s.total} | " + " | ".join(f"{100 * f[x]:.1f}%" for x in KINDS) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="champ")
    ap.add_argument("--first", type=int, default=240)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="2,4")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    try:
        orders = tuple(int(x) for x in a.orders.split(","))
    except ValueError:
        raise SystemExit(f"error: --orders takes k-gram sizes separated by commas (e.g. 2,4), got {a.orders!r}") from None
    if a.n < 2 or min(orders) < 1:
        raise SystemExit("error: --n must be >= 2 (samples to compare) and every order >= 1")
    try:
        results = measure(a.dataset, a.first, a.problems, a.n, a.max_new_tokens, a.temperature, a.seed, orders,
                          a.backend)
    except StandError as e:
        raise SystemExit(f"error: {e}") from None
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "seen": {k: vars(s) for k, s in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
