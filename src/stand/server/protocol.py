"""The OpenAI wire protocol: request bodies, errors in OpenAI's shape, responses and stream chunks, and the
translation of a request into token ids and SamplingParams (a 400 for anything out of range)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from stand.backends.protocol import Backend as Target
from stand.errors import StandError
from stand.params import SamplingParams

MAX_STOP = 4  # as OpenAI


# ---- errors in OpenAI's shape ---------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# ---- request bodies ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, ...) are ignored

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (as vLLM)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): fixed-length outputs for load tests
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    logprobs: bool = False


# ---- request -> sampling parameters -------------------------------------------------------------------


def check_unsupported(req: CommonRequest) -> None:
    """Parameters that would change the output distribution or need what the engine does not keep."""
    if req.presence_penalty or req.frequency_penalty:
        bad = "presence_penalty" if req.presence_penalty else "frequency_penalty"
        raise bad_param(bad, f"{bad} is not supported (it would change the sampling distribution)")
    if req.logit_bias:
        raise bad_param("logit_bias", "logit_bias is not supported")
    if getattr(req, "logprobs", None):
        raise bad_param("logprobs", "logprobs are not supported")
    if getattr(req, "echo", False):
        raise bad_param("echo", "echo is not supported")
    if getattr(req, "suffix", None):
        raise bad_param("suffix", "suffix is not supported")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise bad_param("best_of", "best_of is not supported (ask for n samples and choose)")


def sampling_params(req: CommonRequest, max_tokens: int, max_n: int) -> SamplingParams:
    """The request's sampling parameters; 400 for anything out of range."""
    if not 1 <= req.n <= max_n:
        raise bad_param("n", f"n must be in 1..{max_n}, got {req.n}")
    if not 0.0 <= req.temperature <= 2.0:
        raise bad_param("temperature", f"temperature must be in [0, 2], got {req.temperature}")
    if max_tokens < 1:
        raise bad_param("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} stop sequences, got {len(stop)}")
    params = SamplingParams(req.temperature, req.top_p, req.top_k, max_tokens, req.seed, stop, req.ignore_eos)
    try:
        return params.validate()
    except StandError as e:
        raise bad_param(str(e).split(" ")[0], str(e)) from None


def requested_max_tokens(req: CommonRequest, default: int | None, room: int) -> int:
    """max_completion_tokens, else max_tokens, else the default (None: up to the context)."""
    for value in (req.max_completion_tokens, req.max_tokens, default):
        if value is not None:
            return value
    return max(room, 1)


# ---- request -> prompt token ids -------------------------------------------------------------------------


def check_context(ids: list[int], target: Target, index: int = 0) -> list[int]:
    if not ids:
        raise bad_param("prompt", f"prompt {index} is empty")
    if len(ids) >= target.max_len:
        raise ApiError(413, f"prompt {index} is {len(ids)} tokens; this model's context is {target.max_len} tokens",
                       param="prompt", code="context_length_exceeded")
    if max(ids) >= target.vocab_size or min(ids) < 0:
        raise bad_param("prompt", f"prompt {index} holds token ids outside the vocabulary of {target.vocab_size}")
    return ids


def completion_prompts(prompt, target: Target) -> list[list[int]]:
    """A string, strings, token ids, or lists of token ids -> token ids per prompt (raw, no chat template)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_param("prompt", "prompt is empty")
    ids = [target.encode(p, chat=False) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return [check_context(p, target, i) for i, p in enumerate(ids)]


def message_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise bad_param("messages", f"content parts of type {part.get('type')!r} are not supported")
        parts.append(part.get("text", ""))
    return "".join(parts)


def chat_prompt(messages: list[ChatMessage], target: Target) -> list[int]:
    """Messages through the tokenizer's chat template (for one user message: what Target.encode gives)."""
    if not messages:
        raise bad_param("messages", "messages is empty")
    msgs = [{"role": m.role, "content": message_text(m.content)} for m in messages]
    return check_context(target.encode_messages(msgs), target)


# ---- responses -------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """How a completion or a chat completion is written, whole or as stream chunks."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, choices: list, usage: dict, stats: dict) -> dict:
        """The whole response; each choice has .index, .text and .finish_reason."""
        if self.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in choices]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": out,
                "usage": usage, "stand": stats}

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
