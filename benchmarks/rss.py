"""Peak resident memory of one `stand generate` on the default model, per torch dtype, each in a fresh process:
loading (transformers' de-quantising load for bfloat16; the GGUF's own blocks for int4) and 256 tokens of
decoding. Prints one line per dtype: peak RSS in MiB (getrusage of the child)."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def peak_mib(dtype: str, tokens: int, method: str) -> float:
    code = ("import resource, sys; from stand.cli import app; sys.argv = ['stand', 'generate', "
            f"'What is the sum of the first 20 odd numbers?', '--backend', 'torch', '--dtype', '{dtype}', "
            f"'--method', '{method}', '--temperature', '0.6', '--seed', '0', '--max-new-tokens', '{tokens}'];\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("peak "))
    return int(line.split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", default="int4,bfloat16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--method", default="stand")
    args = ap.parse_args()
    for dtype in args.dtypes.split(","):
        print(f"{dtype}: peak RSS {peak_mib(dtype, args.tokens, args.method):.0f} MiB "
              f"(stand generate, {args.method}, {args.tokens} tokens)", flush=True)


if __name__ == "__main__":
    main()
