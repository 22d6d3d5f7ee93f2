"""How often greedy decoding with drafts departs from plain greedy decoding with the default (Q4_1) model on a
backend (llama.cpp by default; `--backend torch --dtype int4`: our int4 forward): a multi-token pass may round
differently from a one-token pass, so an argmax near a tie can flip. Prints, per method, the problems whose outputs
are identical and the first differing position otherwise."""

from __future__ import annotations

import argparse

from stand.api import generate
from stand.backends.load import load_model
from stand.params import SamplingParams, SpecConfig
from stand.tts.problems import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--first", type=int, default=240)
    ap.add_argument("--problems", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--methods", default="pld,recycle,stand")
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    target = load_model(None, args.dtype, backend=args.backend)
    problems = load_dataset("champ", args.first + args.problems)[args.first:]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)

    def run(method: str) -> list[list[int]]:
        return [generate(p.prompt, target, params=params, spec=SpecConfig(method=method))[0][0].token_ids
                for p in problems]

    plain = run("none")
    total = sum(map(len, plain))
    for method in args.methods.split(","):
        outs = run(method)
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None if len(x) == len(y) else min(len(x), len(y)))
                 for x, y in zip(plain, outs)]
        same = sum(f is None for f in first)
        agree = sum(len(x) if f is None else f for x, f in zip(plain, first))
        print(f"{method}: {same}/{len(problems)} outputs identical to plain greedy; "
              f"{agree}/{total} tokens before the first difference; first differences at {first}")


if __name__ == "__main__":
    main()
