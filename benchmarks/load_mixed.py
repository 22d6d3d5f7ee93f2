"""Load test of `stand serve` with users who make mistakes: C clients x R requests on loopback, each request drawn
(seeded) from a mix of valid requests (short greedy completions, streamed or not, and longer sampled chat requests
with n samples), oversized ones (over a limit, or over the memory budget), malformed ones (bad JSON, wrong types,
lone surrogates, unknown content parts) and cancelled streams (the client reads a little and goes away).

Checks, per backend: every answer is either a well-formed OpenAI error (4xx for every client mistake, never a
500) or a well-formed answer (n choices, text, finish reason, usage; a stream ends with [DONE]); greedy short
answers are compared with the same request sent alone before the load (the share that matches is reported: a
batched pass may round differently from a lone one at a near tie); the server's resident memory, sampled every
50 ms, stays below its memory budget (its own memory at start plus --memory-budget, from /metrics); after the
load it is healthy, with no live rows, nothing queued or reserved and no drafter group held. Figures: requests
and errors by kind, peak RSS against the budget, p50/p99 latency of the short requests (indicative on a busy
machine). Writes load_mixed.json and load_mixed.md into --out.

    python benchmarks/load_mixed.py --backends torch,llama.cpp --clients 8 --requests 50 --out /tmp/load-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from load import rss_mib, stop_server, wait_healthy

SHORT = ["What is 7 x 8?", "Name a primary colour.", "Count from one to five.", "Say hello in French.",
         "What is the capital of Italy?", "Spell the word cat backwards."]
LONG = ["Explain why the sky is blue.", "Write a short story about a robot learning to paint.",
        "Solve: a train goes 60 km/h for 2.5 hours. How far does it go?"]
KINDS = {"short": 0.30, "short-stream": 0.15, "long": 0.15, "oversized": 0.15, "malformed": 0.15, "cancelled": 0.10}
LIMITS = {"max_n": 8, "max_tokens_limit": 512, "max_prompt_tokens": 1024, "max_body_bytes": 65536, "max_queue": 64}


@dataclass
class Outcome:
    kind: str
    status: int
    ok: bool  # the answer or error is what this kind of request must get
    seconds: float
    note: str = ""
    matches: bool | None = None  # a short greedy answer equals the one given alone


@dataclass
class BackendResult:
    backend: str
    requests: int
    by_kind: dict = field(default_factory=dict)  # kind -> {status: count}
    wrong: list = field(default_factory=list)  # outcomes that were not what they must be
    server_errors: int = 0
    greedy_matching: str = ""
    short_p50_s: float = 0.0
    short_p99_s: float = 0.0
    peak_rss_mib: float = 0.0
    budget_mib: float = 0.0
    start_rss_mib: float = 0.0
    after: dict = field(default_factory=dict)
    seconds: float = 0.0
    budget_line: str = ""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,llama.cpp")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per client")
    p.add_argument("--memory-budget", type=int, default=700,
                   help="--memory-budget of the server (MiB): a request of eight prompts (eight 64 MiB tables) is over it")
    p.add_argument("--method", default="stand")
    p.add_argument("--dtype", default="float32", help="torch backend's dtype (float32: no dtype measurement)")
    p.add_argument("--cost", default="tree", help="--cost of the server (tree: the calibrated tree's grid, nothing "
                                                  "measured at start)")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/load-mixed", help="folder for load_mixed.json, load_mixed.md, server logs")
    return p.parse_args()


# ---- the requests ---------------------------------------------------------------------------------------------


def short_body(prompt: str, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}


def oversized(rng: random.Random) -> tuple[str, dict | bytes]:
    """A request over a limit: (path, JSON body or raw bytes)."""
    return rng.choice([
        ("/v1/completions", {"prompt": "hi", "n": LIMITS["max_n"] + 1}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": LIMITS["max_tokens_limit"] + 1}),
        ("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 4}),  # over max_prompt_tokens
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 4}),  # 9 rows > max_n
        ("/v1/completions", {"prompt": "x" * 70_000}),  # over max_body_bytes: 413
        ("/v1/completions", {"prompt": [f"p{i}" for i in range(8)], "max_tokens": 512}),  # eight tables: over the budget
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
    ])


def malformed(rng: random.Random) -> tuple[str, dict | bytes]:
    return rng.choice([
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": '),  # truncated JSON
        ("/v1/completions", b"\xff\xfe not json"),
        ("/v1/completions", {"prompt": "hi", "n": "three"}),
        ("/v1/completions", {"max_tokens": 4}),  # no prompt
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/completions", json.dumps({"prompt": "a\ud800b"}).encode()),  # a lone surrogate, escaped
        ("/v1/chat/completions", {"messages": "hello"}),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 3}}),
    ])


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def is_error(r: httpx.Response, low: int, high: int) -> bool:
    """A well-formed OpenAI error with a status in [low, high]."""
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return low <= r.status_code <= high and set(error) == {"message", "type", "param", "code"}


def is_answer(doc: dict, n: int) -> bool:
    choices = doc.get("choices") or []
    usage = doc.get("usage") or {}
    return (len(choices) == n and sorted(c["index"] for c in choices) == list(range(n))
            and all(isinstance(c.get("text", c.get("message", {}).get("content")), str) for c in choices)
            and all(c["finish_reason"] in ("stop", "length") for c in choices)
            and usage.get("total_tokens") == usage.get("prompt_tokens", 0) + usage.get("completion_tokens", -1))


def read_stream(r: httpx.Response, n: int, chat: bool) -> tuple[bool, list[str]]:
    """(whether the stream is well-formed: JSON chunks, a finish reason per choice, [DONE] last; texts by choice)."""
    texts, finished, lines = [""] * n, set(), [ln for ln in r.iter_lines() if ln]
    if not lines or lines[-1] != "data: [DONE]":
        return False, texts
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            return False, texts
        for c in chunk.get("choices", []):
            texts[c["index"]] += (c["delta"].get("content") or "") if chat else c["text"]
            if c.get("finish_reason"):
                finished.add(c["index"])
    return finished == set(range(n)), texts


# ---- one request of each kind -------------------------------------------------------------------------------------


def one(client: httpx.Client, kind: str, rng: random.Random, reference: dict) -> Outcome:
    t0 = time.perf_counter()
    if kind in ("short", "short-stream"):
        prompt = rng.choice(SHORT)
        if kind == "short":
            r = client.post("/v1/completions", json=short_body(prompt, False))
            ok = r.status_code == 200 and is_answer(r.json(), 1)
            text = r.json()["choices"][0]["text"] if ok else None
        else:
            with client.stream("POST", "/v1/completions", json=short_body(prompt, True)) as r:
                ok, texts = read_stream(r, 1, chat=False) if r.status_code == 200 else (False, [None])
            text = texts[0]
        return Outcome(kind, r.status_code, ok, time.perf_counter() - t0, matches=ok and text == reference[prompt])
    if kind == "long":
        return long_request(client, rng, t0)
    if kind == "cancelled":
        body = {"prompt": rng.choice(LONG), "max_tokens": 400, "temperature": 0.7, "stream": True, "n": 2}
        with client.stream("POST", "/v1/completions", json=body) as r:
            for _ in zip(range(3), r.iter_lines()):
                pass
        return Outcome(kind, r.status_code, r.status_code == 200, time.perf_counter() - t0)
    path, body = oversized(rng) if kind == "oversized" else malformed(rng)
    r = post(client, path, body)
    return Outcome(kind, r.status_code, is_error(r, 400, 499), time.perf_counter() - t0,
                   "" if is_error(r, 400, 499) else f"{path} {str(body)[:80]} -> {r.status_code} {r.text[:200]}")


def long_request(client: httpx.Client, rng: random.Random, t0: float) -> Outcome:
    n, stream = rng.choice([1, 2, 4]), rng.random() < 0.5
    body = {"messages": [{"role": "user", "content": rng.choice(LONG)}], "n": n, "max_tokens": rng.choice([32, 64]),
            "temperature": 0.7, "seed": rng.randrange(1000), "stream": stream}
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            ok = r.status_code == 200 and read_stream(r, n, chat=True)[0]
    else:
        r = client.post("/v1/chat/completions", json=body)
        ok = r.status_code == 200 and is_answer(r.json(), n)
    return Outcome("long", r.status_code, ok, time.perf_counter() - t0)


# ---- one backend ---------------------------------------------------------------------------------------------------


def start(backend: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "stand.cli", "serve", "--backend", backend, "--method", args.method,
           "--port", str(args.port), "--dtype", args.dtype, "--memory-budget", str(args.memory_budget),
           "--cost", args.cost,
           "--max-n", str(LIMITS["max_n"]), "--max-tokens-limit", str(LIMITS["max_tokens_limit"]),
           "--default-max-tokens", "64", "--max-prompt-tokens", str(LIMITS["max_prompt_tokens"]),
           "--max-body-bytes", str(LIMITS["max_body_bytes"]), "--max-queue", str(LIMITS["max_queue"])]
    log_path = os.path.join(args.out, f"server-{backend}.log")
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT), log_path


def sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.wait(0.05):
        rss = rss_mib(pid, "VmRSS")
        if rss is not None:
            peak[0] = max(peak[0], rss)


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^stand_(\w+) (\S+)$", text, re.M)}


def run_clients(client: httpx.Client, args: argparse.Namespace, reference: dict) -> list[Outcome]:
    def one_client(c: int) -> list[Outcome]:
        rng = random.Random(args.seed * 1000 + c)
        kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=args.requests)
        return [one(client, kind, rng, reference) for kind in kinds]

    with ThreadPoolExecutor(args.clients) as pool:
        return [o for per_client in pool.map(one_client, range(args.clients)) for o in per_client]


def measure(backend: str, args: argparse.Namespace) -> BackendResult:
    proc, log_path = start(backend, args)
    base, stop, peak = f"http://127.0.0.1:{args.port}", threading.Event(), [0.0]
    try:
        wait_healthy(base, proc, log_path)
        with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=4 * args.clients)) as client:
            reference = {p: client.post("/v1/completions", json=short_body(p, False)).json()["choices"][0]["text"]
                         for p in SHORT}  # each alone, before the load
            start_rss = rss_mib(proc.pid, "VmRSS")
            watcher = threading.Thread(target=sample_rss, args=(proc.pid, stop, peak), daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            outcomes = run_clients(client, args, reference)
            seconds = time.perf_counter() - t0
            time.sleep(2)  # cancelled rows end at their next step
            after = {**metrics(client), "health": client.get("/health").status_code}
    finally:
        stop.set()
        stop_server(proc)
    line = next((ln.split("stand.server: ", 1)[-1] for ln in open(log_path) if "memory budget:" in ln), "")
    return summarise(backend, outcomes, seconds, peak[0], start_rss, after, line)


def summarise(backend: str, outcomes: list[Outcome], seconds: float, peak: float, start_rss: float, after: dict,
              line: str) -> BackendResult:
    res = BackendResult(backend, len(outcomes), seconds=round(seconds, 1), peak_rss_mib=round(peak, 1),
                        start_rss_mib=start_rss, budget_mib=round(after.get("memory_budget_bytes", 0) / 2**20, 1),
                        after=after, budget_line=line)
    for o in outcomes:
        res.by_kind.setdefault(o.kind, {}).setdefault(str(o.status), 0)
        res.by_kind[o.kind][str(o.status)] += 1
        if not o.ok:
            res.wrong.append(asdict(o))
    res.server_errors = sum(o.status >= 500 for o in outcomes)
    greedy = [o for o in outcomes if o.matches is not None and o.ok]
    res.greedy_matching = f"{sum(o.matches for o in greedy)}/{len(greedy)}"
    short = sorted(o.seconds for o in outcomes if o.kind == "short" and o.ok)
    res.short_p50_s, res.short_p99_s = (round(float(np.percentile(short, q)), 3) for q in (50, 99))
    return res


def verdict(r: BackendResult) -> list[str]:
    """What failed (empty: every check passed)."""
    a = r.after
    checks = {"every response well-formed and of its kind": not r.wrong, "no 5xx": r.server_errors == 0,
              "peak RSS below the budget": 0 < r.peak_rss_mib < r.budget_mib,
              "healthy afterwards": a.get("health") == 200,
              "nothing live, queued or reserved": a.get("live_rows") == a.get("queue_depth") == 0
              and a.get("memory_reserved_bytes") == 0,
              "no drafter group held": a.get("drafter_groups") == 0}
    return [name for name, passed in checks.items() if not passed]


def table(results: list[BackendResult], args: argparse.Namespace) -> str:
    kinds = list(KINDS)
    lines = [f"{args.clients} clients x {args.requests} requests, --method {args.method}, --memory-budget "
             f"{args.memory_budget} MiB, torch dtype {args.dtype}", "",
             "| backend | requests | " + " | ".join(f"{k} (status: count)" for k in kinds)
             + " | 5xx | greedy = alone | short p50 / p99 s | RSS start / peak / budget MiB | checks |",
             "|---" * (len(kinds) + 7) + "|"]
    for r in results:
        counts = [", ".join(f"{s}: {c}" for s, c in sorted(r.by_kind.get(k, {}).items())) for k in kinds]
        failed = verdict(r)
        lines.append(f"| {r.backend} | {r.requests} | " + " | ".join(counts) + f" | {r.server_errors} | "
                     f"{r.greedy_matching} | {r.short_p50_s} / {r.short_p99_s} | {r.start_rss_mib} / "
                     f"{r.peak_rss_mib} / {r.budget_mib} | {'all passed' if not failed else 'FAILED: ' + '; '.join(failed)} |")
    return "\n".join(lines + [""] + [f"{r.backend}: {r.budget_line}" for r in results]) + "\n"


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [measure(b.strip(), args) for b in args.backends.split(",") if b.strip()]
    text = table(results, args)
    print(text)
    with open(os.path.join(args.out, "load_mixed.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "load_mixed.json"), "w") as f:
        json.dump({"config": vars(args), "limits": LIMITS, "kinds": KINDS,
                   "results": [{**asdict(r), "failed": verdict(r)} for r in results]}, f, indent=2)
    sys.exit(1 if any(verdict(r) for r in results) else 0)


if __name__ == "__main__":
    main()
