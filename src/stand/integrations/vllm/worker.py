"""vLLM in a process of its own, driven by JSON lines: `python -m stand.integrations.vllm.worker` under the
interpreter that has vLLM (launch.vllm_python). client.py is the other end.

The first line is the engine: {"model", "dtype", "max_model_len", "seed", "speculative_config", "eager",
"max_num_seqs", "tokenizer"} (tokenizer false: the model directory has none; prompts and outputs are ids anyway); the
worker answers {"ready": true, "vllm": version} once vLLM is up. Then each line is a request
{"prompts": [[ids]], "n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop_token_ids",
"ignore_eos"}, answered with {"outputs": [[[ids] per sample] per prompt], "seconds", "spec": {...}}: the wall time
of vLLM's generate and the speculative counters of that call. Protocol lines go to the original stdout; everything
else the process prints (vLLM logs to stdout) goes to stderr. An error is answered {"error": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def protocol_channel():
    """The original stdout, for protocol lines only; fd 1 then points at stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def make_llm(engine: dict):
    from vllm import LLM

    return LLM(model=engine["model"], dtype=engine.get("dtype", "auto"), seed=engine.get("seed", 0),
               max_model_len=engine.get("max_model_len", 4096), enforce_eager=engine.get("eager", True),
               speculative_config=engine.get("speculative_config"), generation_config="vllm",
               max_num_seqs=engine.get("max_num_seqs", 64), disable_log_stats=False,
               skip_tokenizer_init=not engine.get("tokenizer", True))


def sampling(req: dict, n: int, seed):
    """vLLM's SamplingParams for one request: stand's sampling fields; top_k 0 is off in both."""
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=req["temperature"], top_p=req.get("top_p", 1.0),
                          top_k=req.get("top_k", 0) or -1, max_tokens=req["max_tokens"], seed=seed,
                          stop_token_ids=req.get("stop_token_ids") or None, ignore_eos=req.get("ignore_eos", False))


def requests(req: dict) -> tuple[list[dict], list]:
    """One vLLM prompt per (prompt, sample) at greedy (vLLM refuses n > 1 there), else one per prompt with n."""
    n, seed = req.get("n", 1), req.get("seed")
    if req["temperature"] == 0 and n > 1:
        prompts = [{"prompt_token_ids": p} for p in req["prompts"] for _ in range(n)]
        return prompts, [sampling(req, 1, seed)] * len(prompts)
    return [{"prompt_token_ids": p} for p in req["prompts"]], [sampling(req, n, seed)] * len(req["prompts"])


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters so far (drafts, draft tokens, accepted tokens) and stand's drafting
    time, summed over this process's proposers (none when vLLM runs its engine core in a process of its own)."""
    from stand.integrations.vllm.proposer import LIVE

    out = {"draft_seconds": sum(p.stats.seconds for p in LIVE)} if len(LIVE) else {}
    for metric in llm.get_metrics():
        name = metric.name.removeprefix("vllm:spec_decode_")
        if metric.name.startswith("vllm:spec_decode_num_") and hasattr(metric, "value"):
            out[name] = out.get(name, 0) + metric.value
    return out


def generate(llm, req: dict) -> dict:
    prompts, params = requests(req)
    before = spec_counters(llm)
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    after = spec_counters(llm)
    outs = [[list(c.token_ids) for c in r.outputs] for r in results]
    if req["temperature"] == 0 and req.get("n", 1) > 1:  # regroup the n single samples per prompt
        n = req["n"]
        outs = [sum(outs[i:i + n], []) for i in range(0, len(outs), n)]
    return {"outputs": outs, "seconds": seconds, "spec": {k: after[k] - before.get(k, 0) for k in after}}


def serve(channel, lines) -> None:
    engine = json.loads(next(lines))
    llm = make_llm(engine)
    import vllm

    channel.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")
    for line in lines:
        try:
            answer = generate(llm, json.loads(line))
        except Exception as e:  # the client shows it; the engine stays up for the next request
            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        channel.write(json.dumps(answer) + "\n")


def main() -> None:
    channel = protocol_channel()
    try:
        serve(channel, iter(sys.stdin.readline, ""))
    except Exception as e:
        traceback.print_exc()
        channel.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
