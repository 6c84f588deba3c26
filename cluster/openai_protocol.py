"""OpenAI request and response schemas for /v1/completions and /v1/chat/completions.

Requests decode with msgspec. Unknown fields are ignored, as the OpenAI API does; a wrong type
is an ``OpenAIError`` naming the field. ``sampling_params`` maps a request to validated
``SamplingParams``.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, TypeVar

import msgspec

from outrider.workers.config import ConfigError, SamplingParams

T = TypeVar("T")


class OpenAIError(Exception):
    """An error answered in the OpenAI shape; ``status`` is both the HTTP status and the code."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.status))


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


# -- requests ---------------------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _CommonRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class CompletionRequest(_CommonRequest, kw_only=True):
    prompt: str | list[int | str | list[int]] | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_CommonRequest, kw_only=True):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


_AT = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.S)


def decode_request(body: bytes, type_: type[T]) -> T:
    if not body.strip():
        raise OpenAIError("the request body is empty: send a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        what, path = (m.group(1), m.group(2)) if m else (str(e), "")
        if not path:
            raise OpenAIError(f"invalid request body: {what[:1].lower()}{what[1:]}") from None
        param = re.split(r"[.\[]", path, maxsplit=1)[0]
        message = f"invalid `{path}`: {what[:1].lower()}{what[1:]}"
        raise OpenAIError(message, param=param) from None
    except msgspec.DecodeError as e:
        raise OpenAIError(f"the request body is not valid JSON: {e}") from None


def _unsupported(req: _CommonRequest) -> None:
    if req.n is not None and req.n != 1:
        raise OpenAIError(f"`n` must be 1, got {req.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0):
            raise OpenAIError(
                f"`{name}` must be 0 (penalties are not supported), got {value}", param=name
            )
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(
            "`stream_options` is only allowed when `stream` is true", param="stream_options"
        )
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise OpenAIError("`echo` must be false (echo is not supported)", param="echo")
        if req.logprobs is not None:
            raise OpenAIError(
                "`logprobs` must be null (logprobs are not supported)", param="logprobs"
            )
        if req.best_of not in (None, 1):
            raise OpenAIError(f"`best_of` must be 1, got {req.best_of}", param="best_of")
    elif isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise OpenAIError(
                "`logprobs` must be false (logprobs are not supported)", param="logprobs"
            )


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    _unsupported(req)
    prompt = req.prompt
    if prompt is None:
        raise OpenAIError("`prompt` is required", param="prompt")
    if not prompt:
        raise OpenAIError("`prompt` must not be empty", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, int) for p in prompt):
        return [int(p) for p in prompt]  # type: ignore[arg-type]
    if len(prompt) == 1 and isinstance(prompt[0], str | list):
        return prompt[0]  # type: ignore[return-value]
    if len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise OpenAIError(
            f"only one prompt per request is supported, got {len(prompt)}", param="prompt"
        )
    raise OpenAIError(
        "`prompt` must be a string, a list of token ids or a list with one string", param="prompt"
    )


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    _unsupported(req)
    if not req.messages:
        raise OpenAIError("`messages` is required and must not be empty", param="messages")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(req.messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        f"only text content parts are supported, got `{part.type}` at "
                        f"messages[{i}].content[{j}]",
                        param="messages",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        out.append({"role": msg.role, "content": content or ""})
    return out


def _context_error(n_prompt: int, max_tokens: int, max_model_len: int, where: str) -> OpenAIError:
    return OpenAIError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{n_prompt + max_tokens} tokens ({n_prompt} in the {where}, {max_tokens} in the "
        f"completion). Please reduce the length of the {where} or completion.",
        param="max_tokens",
    )


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, *, n_prompt: int, max_model_len: int
) -> SamplingParams:
    chat = isinstance(req, ChatCompletionRequest)
    where = "messages" if chat else "prompt"
    if n_prompt == 0:
        raise OpenAIError(f"the {where} is empty", param=where)
    if n_prompt >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{where} has {n_prompt} tokens, which leaves no room for the completion.",
            param=where,
        )
    max_tokens = req.max_completion_tokens if chat else None  # type: ignore[union-attr]
    if max_tokens is None:
        max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - n_prompt if chat else 16
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise OpenAIError("`stop` strings must not be empty", param="stop")
    bad_ids = [t for t in req.stop_token_ids or [] if t < 0]
    if bad_ids:
        raise OpenAIError(
            f"`stop_token_ids` must be >= 0, got {bad_ids[0]}", param="stop_token_ids"
        )
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else -1
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=req.seed,
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
    )
    try:
        params.validate()
    except ConfigError as e:
        m = re.match(r"`(\w+)`", str(e))
        raise OpenAIError(str(e), param=m.group(1) if m else None) from None
    if n_prompt + max_tokens > max_model_len:
        raise _context_error(n_prompt, max_tokens, max_model_len, where)
    return params


# -- responses --------------------------------------------------------------------------------
class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    max_model_len: int
    object: str = "model"
    owned_by: str = "outrider"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class CompletionFormat:
    """Builds the response and stream chunks of one completion request."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = new_id("cmpl"), now(), model

    def head(self) -> list[Any]:
        return []

    def chunk(self, text: str, finish: str | None, usage: Usage | None) -> Any:
        choice = CompletionChoice(0, text, finish)
        return CompletionResponse(self.id, self.created, self.model, [choice], usage)

    def usage_chunk(self, usage: Usage) -> Any:
        return CompletionResponse(self.id, self.created, self.model, [], usage)

    def response(self, text: str, finish: str, usage: Usage) -> Any:
        choice = CompletionChoice(0, text, finish)
        return CompletionResponse(self.id, self.created, self.model, [choice], usage)


class ChatFormat(CompletionFormat):
    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), model

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None) -> Any:
        return ChatCompletionChunk(self.id, self.created, self.model, choices, usage)

    def head(self) -> list[Any]:
        return [self._chunk([ChatChunkChoice(0, Delta("assistant", ""), None)], None)]

    def chunk(self, text: str, finish: str | None, usage: Usage | None) -> Any:
        delta = Delta(content=text) if text else Delta()
        return self._chunk([ChatChunkChoice(0, delta, finish)], usage)

    def usage_chunk(self, usage: Usage) -> Any:
        return self._chunk([], usage)

    def response(self, text: str, finish: str, usage: Usage) -> Any:
        choice = ChatChoice(0, AssistantMessage(text), finish)
        return ChatCompletionResponse(self.id, self.created, self.model, [choice], usage)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
