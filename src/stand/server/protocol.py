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
from stand.server.config import ServerConfig

MAX_STOP = 4  # as OpenAI
MAX_SEED = 2**63  # seeds are in [0, 2^63)
MIN_TEMPERATURE = 1e-3  # below it (and above 0) a request is decoded greedily: see effective_temperature
# Fields that OpenAI or other OpenAI-compatible servers (vLLM) accept and this server does not honour: a request
# may send them only at a value that changes nothing (the first is the default); any other value gets a 400.
NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (1.0,), "min_p": (0.0,),
    "min_tokens": (0,), "logit_bias": (None, {}), "stop_token_ids": (None, []), "bad_words": (None, []),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "use_beam_search": (False,),
    "length_penalty": (1.0,), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "prompt_logprobs": (None, 0),
    "echo": (False,), "suffix": (None, ""), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "truncate_prompt_tokens": (None,),
}


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


def queue_full(limit: int) -> ApiError:
    return ApiError(429, f"the server queue is full ({limit} requests waiting); retry later", type_="rate_limit_error",
                    code="queue_full")


def internal_error(what: str = "the server") -> ApiError:
    """A failure that is not the client's: the details go to the server's log, not to the client."""
    return ApiError(500, f"{what} failed on this request (the server's log has the details)", "server_error",
                    code="internal_error")


# ---- request bodies ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Unknown fields are allowed (OpenAI's user, metadata, ...: nothing they change is sampled); those in
    NEUTRAL are checked."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (as vLLM): 0 or -1 = off
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): fixed-length outputs for load tests


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]


# ---- request -> sampling parameters -------------------------------------------------------------------


def check_unsupported(req: CommonRequest) -> None:
    """Fields this server does not honour, at a value that would change the output: 400 naming the field."""
    given = req.model_extra or {}  # every NEUTRAL field is undeclared
    for name, neutral in NEUTRAL.items():
        if name in given and not any(given[name] == v for v in neutral):
            raise bad_param(name, f"{name}={given[name]!r} is not supported by this server (it would change what "
                                  f"is sampled); leave it out or send {neutral[0]!r}")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise bad_param("best_of", "best_of is not supported (ask for n samples and choose)")


def effective_temperature(t: float) -> float:
    """The temperature decoded: 0 < t < MIN_TEMPERATURE (1e-3) is decoded greedily (temperature 0).

    At such a temperature the next token differs from the argmax with probability about exp(-gap / t), where gap
    is the distance of the two top logits: under exp(-10) unless the two are within 0.01 of each other; and as t
    goes to 0, logits / t overflows float32 (t < ~1e-37 gives inf and NaN probabilities). Greedy is what such a
    request asks for, and what OpenAI-compatible servers (vLLM below 1e-5) give.
    """
    return 0.0 if t < MIN_TEMPERATURE else t


def sampling_params(req: CommonRequest, max_tokens: int, config: ServerConfig) -> SamplingParams:
    """The request's sampling parameters; 400 naming the field for anything out of range."""
    if not 1 <= req.n <= config.max_n:
        raise bad_param("n", f"n must be in 1..{config.max_n}, got {req.n}")
    if not 0.0 <= req.temperature <= 2.0:
        raise bad_param("temperature", f"temperature must be in [0, 2], got {req.temperature}")
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise bad_param("seed", f"seed must be in [0, 2^63), got {req.seed}")
    if req.top_k < -1:
        raise bad_param("top_k", f"top_k must be >= 0 (0 or -1: off), got {req.top_k}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} stop sequences, got {len(stop)}")
    for s in stop:
        check_text(s, "stop", "a stop sequence")
    params = SamplingParams(effective_temperature(req.temperature), req.top_p, max(req.top_k, 0), max_tokens,
                            req.seed, stop, req.ignore_eos)
    try:
        return params.validate()
    except StandError as e:
        raise bad_param(str(e).split(" ")[0], str(e)) from None


def requested_max_tokens(req: CommonRequest, config: ServerConfig) -> int:
    """max_completion_tokens, else max_tokens, else the server's default; 400 beyond 1..max_tokens_limit."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is None:
            continue
        if not 1 <= value <= config.max_tokens_limit:
            raise bad_param(name, f"{name} must be in 1..{config.max_tokens_limit}, got {value}")
        return value
    return config.default_max_tokens


def check_rows(prompts: int, n: int, config: ServerConfig) -> None:
    """A completions request's rows: its prompts times n."""
    if prompts * n > config.max_n:
        raise bad_param("prompt", f"{prompts} prompts x n={n} is {prompts * n} samples; a request may ask for "
                                  f"at most {config.max_n}")


# ---- request -> prompt token ids -------------------------------------------------------------------------


def check_context(ids: list[int], target: Target, limit: int, index: int = 0, param: str = "prompt") -> list[int]:
    """A prompt's token ids: not empty, within the model's context (else 413) and the server's limit (else 400)."""
    what = f"prompt {index}" if param == "prompt" else "the chat prompt (messages through the chat template)"
    if not ids:
        raise bad_param(param, f"{what} is empty")
    if len(ids) >= target.max_len:
        raise ApiError(413, f"{what} is {len(ids)} tokens; this model's context is {target.max_len} tokens",
                       param=param, code="context_length_exceeded")
    if len(ids) > limit:
        raise bad_param(param, f"{what} is {len(ids)} tokens; this server takes prompts of at most {limit}")
    if max(ids) >= target.vocab_size or min(ids) < 0:
        raise bad_param(param, f"{what} holds token ids outside the vocabulary of {target.vocab_size}")
    return ids


def split_prompts(prompt) -> list:
    """A completions request's prompt -> its prompts (each a string or token ids)."""
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt", "the prompt")]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise bad_param("prompt", "prompt is empty")
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            check_text(p, "prompt", f"prompt {i}")
    return list(prompt)


def completion_prompts(prompts: list, target: Target, limit: int) -> list[list[int]]:
    """split_prompts' prompts -> token ids per prompt (raw, no chat template); limit: the most tokens a prompt
    may have. Tokenises: run it off the event loop."""
    ids = [target.encode(p, chat=False) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return [check_context(p, target, limit, i) for i, p in enumerate(ids)]


def check_text(text: str, param: str, what: str) -> str:
    """text, if it is valid Unicode (a lone surrogate such as "\\ud800" is not: no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_param(param, f"{what} is not valid Unicode (a lone surrogate)") from None
    return text


def message_text(content) -> str:
    """A message's content (a string, or text parts) as one string."""
    if content is None or isinstance(content, str):
        return check_text(content or "", "messages", "a message's content")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_param("messages", f"content parts of type {kind!r} are not supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_param("messages", f"a text content part needs a string 'text', got {text!r}")
        parts.append(check_text(text, "messages", "a content part's text"))
    return "".join(parts)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them ({"role", "content"}), checked."""
    if not messages:
        raise bad_param("messages", "messages is empty")
    return [{"role": m.role, "content": message_text(m.content)} for m in messages]


def chat_prompt(msgs: list[dict], target: Target, limit: int) -> list[int]:
    """chat_messages' messages through the tokenizer's chat template (for one user message: what Target.encode
    gives); limit: the most tokens the prompt may have. Tokenises: run it off the event loop."""
    return check_context(target.encode_messages(msgs), target, limit, param="messages")


def longest_token_bytes(target: Target) -> int:
    """The most UTF-8 bytes a token decodes to, plus one (the space a SentencePiece token may start with)."""
    return max(len(target.decode([i]).encode("utf-8")) for i in range(target.vocab_size)) + 1


def check_untokenized(texts: list, token_bytes: int, limit: int, param: str) -> None:
    """Refuses, without tokenising it, a prompt that must be over `limit` tokens: token ids beyond it, or a text of
    B UTF-8 bytes, which is at least B / token_bytes tokens (token_bytes: longest_token_bytes). The texts of
    one chat prompt are counted together; the work a prompt can cost the tokeniser is bounded so."""
    for i, text in enumerate(texts):
        what = f"prompt {i}" if param == "prompt" else "the chat prompt"
        if not isinstance(text, str):
            if len(text) > limit:
                raise bad_param(param, f"{what} is {len(text):,} tokens; this server takes prompts of at most "
                                       f"{limit:,}")
            continue
        size = len(text.encode("utf-8"))
        if size > limit * token_bytes:
            raise bad_param(param, f"{what} is {size:,} bytes, so at least {size // token_bytes:,} tokens; this "
                                   f"server takes prompts of at most {limit:,} tokens")


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

    def whole(self, choices: list, usage: dict, stats: dict | None) -> dict:
        """The whole response; each choice has .index, .text and .finish_reason; stats (None: left out) go
        under "stand"."""
        if self.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in choices]
        whole = {**self._head("chat.completion" if self.chat else "text_completion"), "choices": out, "usage": usage}
        return whole if stats is None else {**whole, "stand": stats}

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
