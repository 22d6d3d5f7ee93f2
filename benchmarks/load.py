"""Load test of `stand serve`: C concurrent clients, each asking n samples per request; tokens/s and the server
process's peak memory per method.

For each method, starts `stand serve --method M` on a loopback port, waits for /health, sends one short
warm-up request, notes the server's resident memory (idle_rss_mib), then lets the clients go (client c asks
CHAMP problems c, c + C, ...; chat completions with n samples each; --prompt-tokens N pads each prompt to about
N tokens with other CHAMP problems) and counts completion tokens over the wall time; peak_rss_mib is the
process's high-water mark (VmHWM) at the end. Methods run one after another on the same requests; compare them
within one run, on an otherwise idle machine. Every loop is bounded: clients x requests requests in all.

    python benchmarks/load.py --methods none,stand --clients 4 --n 4 --requests 2 --max-tokens 128
    python benchmarks/load.py --methods stand --requests 1 --max-tokens 64 --prompt-tokens 2000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
import openai

from stand.tts.problems import champ

CHARS_PER_TOKEN = 3.5  # CHAMP text in SmolLM2's tokenizer


@dataclass
class LoadResult:
    method: str
    requests: int
    completion_tokens: int
    seconds: float
    tok_per_s: float
    mean_latency_s: float
    mean_accepted: float
    draft_seconds: float
    prompt_tokens: float  # mean per request, as the server counted them
    idle_rss_mib: float | None  # the server after loading and one warm-up request
    peak_rss_mib: float | None  # its high-water mark after the load
    speedup_vs_none: float | None = None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="none,stand", help="comma-separated methods, each served in turn")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--n", type=int, default=4, help="samples per request")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="pad each prompt with other CHAMP problems to about this many tokens (e.g. 2000)")
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--share-table", action="store_true", help="serve with --share-table")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temporary name in /tmp)")
    return p.parse_args()


def start_server(method: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "stand.cli", "serve", "--method", method, "--host", "127.0.0.1",
           "--port", str(args.port), "--dtype", args.dtype, "--max-queue", str(4 * args.clients)]
    if args.model:
        cmd += ["--model", args.model]
    if args.share_table:
        cmd += ["--share-table"]
    log_path = os.path.join(args.log_dir or "/tmp", f"stand-load-{method}.log")
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return proc, log_path


def wait_healthy(base: str, proc: subprocess.Popen, log_path: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"the server was not healthy after {timeout:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # graceful: a --table would be saved
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mib(pid: int, field: str) -> float | None:
    """VmHWM (peak resident memory) or VmRSS of a process, in MiB (None where /proc has no such line)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((ln for ln in f if ln.startswith(field + ":")), None)
    except OSError:
        return None
    return round(int(line.split()[1]) / 1024, 1) if line else None


def padded_prompts(prompts: list[str], tokens: int | None, pool: list[str]) -> list[str]:
    """Each prompt after other problems, to about `tokens` tokens (CHARS_PER_TOKEN characters a token)."""
    if not tokens:
        return prompts
    out = []
    for i, p in enumerate(prompts):
        before, k = [], i + 1
        while sum(len(b) for b in before) + len(p) < CHARS_PER_TOKEN * tokens and k < i + 1 + len(pool):
            before.append(pool[k % len(pool)])
            k += 1
        text = "\n\n".join(before) + "\n\nNow the problem to solve:\n" + p
        out.append(text[-int(CHARS_PER_TOKEN * tokens):])
    return out


def ask(client: openai.OpenAI, prompt: str, seed: int, args: argparse.Namespace) -> tuple[int, float, dict, int]:
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}], n=args.n,
                                       temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
    assert len(r.choices) == args.n
    stats = (r.model_extra or {}).get("stand", {})
    return r.usage.completion_tokens, time.perf_counter() - t0, stats, r.usage.prompt_tokens


def run_clients(base: str, prompts: list[str], args: argparse.Namespace) -> tuple[list, float]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)

    def one_client(c: int) -> list:
        return [ask(client, prompts[(c + k * args.clients) % len(prompts)], k, args) for k in range(args.requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for per_client in pool.map(one_client, range(args.clients)) for r in per_client]
    return results, time.perf_counter() - t0


def measure(method: str, prompts: list[str], args: argparse.Namespace) -> LoadResult:
    base = f"http://127.0.0.1:{args.port}"
    proc, log_path = start_server(method, args)
    try:
        wait_healthy(base, proc, log_path)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        idle = rss_mib(proc.pid, "VmRSS")
        results, seconds = run_clients(base, prompts, args)
        peak = rss_mib(proc.pid, "VmHWM")
    finally:
        stop_server(proc)
    tokens = sum(r[0] for r in results)
    steps = sum(r[2].get("steps", 0) for r in results)
    return LoadResult(method, len(results), tokens, round(seconds, 2), round(tokens / seconds, 1),
                      round(sum(r[1] for r in results) / len(results), 2), round(tokens / max(steps, 1), 2),
                      round(sum(r[2].get("draft_seconds", 0.0) for r in results), 2),
                      round(sum(r[3] for r in results) / len(results), 1), idle, peak)


def main() -> None:
    args = parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    pool = [p.prompt for p in champ(None)]
    prompts = padded_prompts(pool[: args.clients * args.requests], args.prompt_tokens, pool)
    rows = [measure(m, prompts, args) for m in methods]
    base = next((r.tok_per_s for r in rows if r.method == "none"), None)
    for r in rows:
        r.speedup_vs_none = round(r.tok_per_s / base, 2) if base else None
    print(f"{args.clients} clients x {args.requests} requests, n={args.n}, T={args.temperature}, "
          f"max_tokens={args.max_tokens}, prompt_tokens={args.prompt_tokens or 'as given'}")
    cols = list(asdict(rows[0]))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(v) for v in asdict(r).values()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"config": vars(args), "results": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
