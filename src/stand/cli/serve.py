"""`stand serve`: the OpenAI-compatible server (our engine, or vLLM with stand's proposers)."""

from __future__ import annotations

from typing import Optional

import typer

from stand.cli.common import BackendOpt, DtypeOpt, MethodOpt, ModelOpt, app, user_errors
from stand.server.memory import serve_help


@app.command("serve", help=serve_help())
@user_errors
def serve_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    method: MethodOpt = "stand",
    host: str = typer.Option("127.0.0.1", "--host", help="Listen here (not loopback without --api-key: a warning)"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STAND_API_KEY", help="Every request must send Authorization: Bearer KEY (/health excepted)"),
    table: Optional[str] = typer.Option(None, "--table", help="n-gram table file shared by all requests: loaded at start, saved on shutdown"),
    share_table: bool = typer.Option(False, "--share-table", help="One drafter table for every request (a warm server drafts better)"),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for room beyond this get 429"),
    default_max_tokens: int = typer.Option(512, "--default-max-tokens", help="max_tokens of a request that gives none"),
    max_tokens_limit: int = typer.Option(4096, "--max-tokens-limit", help="The most max_tokens a request may ask for"),
    max_n: int = typer.Option(16, "--max-n", help="The most samples per request (n, times the prompts of a completions request)"),
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", help="The longest prompt, in tokens (over the model's context: 413)"),
    max_live_rows: int = typer.Option(64, "--max-live-rows", help="Rows decoding at once; requests beyond wait in the queue"),
    max_live_tokens: Optional[int] = typer.Option(None, "--max-live-tokens", help="KV tokens running requests may reserve (prompts + n x max_tokens); default: the llama.cpp cache's size, unbounded on torch"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="The largest request body (beyond: 413)"),
    engine: str = typer.Option("stand", "--engine", help="stand | vllm: `vllm serve` with stand's proposer (scripts/setup-vllm.sh; docs/vllm.md)"),
):
    if engine != "stand":  # this process becomes `vllm serve`
        from stand.integrations.vllm.launch import serve_vllm
        return serve_vllm(model, method, host, port, dtype, api_key, table, share_table, engine)
    from stand.server.app import ServerConfig, serve

    serve(ServerConfig(model=model, method=method, backend=backend, dtype=dtype, host=host, port=port,
                       api_key=api_key, table=table, share_table=share_table, max_queue=max_queue,
                       default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit, max_n=max_n,
                       max_prompt_tokens=max_prompt_tokens, max_live_rows=max_live_rows,
                       max_live_tokens=max_live_tokens, max_body_bytes=max_body_bytes).validate())
