"""OpenAI-compatible HTTP app over an AsyncEngine.

No Ray here: the Serve router mounts this app with ``serve.ingress``; ``outrider serve`` and the
tests run it under uvicorn. A client that goes away, streamed or not, closes its engine iterator,
which aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from jinja2 import TemplateError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from outrider.cluster import openai_protocol as op
from outrider.cluster.async_engine import EngineDead, EngineOverloaded, GenerationChunk
from outrider.workers.config import ConfigError, SamplingParams

logger = logging.getLogger("outrider.ingress")

T = TypeVar("T")
RETRY_AFTER_S = 1
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"


class Engine(Protocol):
    @property
    def healthy(self) -> bool: ...

    @property
    def metrics(self) -> Any: ...

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]: ...


class _ClientGone(Exception):
    pass


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(op.encode(obj), status, headers, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + op.encode(obj) + b"\n\n"


def _usage(chunk: GenerationChunk) -> op.Usage:
    return op.Usage.of(chunk.num_prompt_tokens, chunk.num_output_tokens)


def _engine_error(e: BaseException) -> op.OpenAIError | None:
    if isinstance(e, EngineOverloaded):
        return op.OpenAIError(
            f"the server is overloaded, retry later: {e}",
            status=503,
            type="ServiceUnavailableError",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, EngineDead):
        return op.OpenAIError(str(e), status=503, type="ServiceUnavailableError")
    if isinstance(e, ConfigError):
        return op.OpenAIError(str(e))
    return None


async def _aclose(it: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro: Awaitable[T]) -> T:
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone
    return task.result()


class _SSEResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class _OpenAIServer:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        *,
        served_model_name: str,
        max_model_len: int,
        api_key: str | None,
        vocab_size: int | None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = served_model_name
        self.max_model_len = max_model_len
        self.api_key = api_key
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size
        self.created = op.now()

    # -- request checks -------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise op.OpenAIError(
                "invalid or missing API key: send `Authorization: Bearer <key>`",
                status=401,
                type="AuthenticationError",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise op.OpenAIError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                status=404,
                type="NotFoundError",
                param="model",
            )

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise op.OpenAIError(
                    "this model has no tokenizer: send `prompt` as a list of token ids",
                    param="prompt",
                )
            return [int(i) for i in self.tokenizer.encode(prompt)]
        vocab = self.vocab_size
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise op.OpenAIError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt"
            )
        return prompt

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise op.OpenAIError(
                "this model has no tokenizer or chat template: use /v1/completions with token ids",
                param="messages",
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except (TemplateError, ValueError, TypeError) as e:
            msg = f"the chat template rejected `messages`: {e}"
            raise op.OpenAIError(msg, param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def params(
        self, req: op.CompletionRequest | op.ChatCompletionRequest, n_prompt: int
    ) -> SamplingParams:
        params = op.sampling_params(req, n_prompt=n_prompt, max_model_len=self.max_model_len)
        if params.stop and self.tokenizer is None:
            raise op.OpenAIError(
                "`stop` strings need a tokenizer; this model has none", param="stop"
            )
        return params

    # -- generation -----------------------------------------------------------------------------
    async def start(
        self, request: Request, ids: list[int], params: SamplingParams
    ) -> tuple[AsyncIterator[GenerationChunk], GenerationChunk]:
        it = self.engine.generate(ids, params)

        async def first_chunk() -> GenerationChunk:
            return await anext(it)

        try:
            first = await _unless_disconnected(request, first_chunk())
        except Exception as e:
            await _aclose(it)
            err = _engine_error(e)
            if err is None:
                raise
            raise err from None
        return it, first

    async def collect(
        self, request: Request, it: AsyncIterator[GenerationChunk], first: GenerationChunk
    ) -> tuple[str, GenerationChunk]:
        async def drain() -> tuple[str, GenerationChunk]:
            parts, chunk = [first.text], first
            while chunk.finish_reason is None:
                nxt = await anext(it, None)
                if nxt is None:
                    break
                chunk = nxt
                parts.append(chunk.text)
            return "".join(parts), chunk

        try:
            return await _unless_disconnected(request, drain())
        except Exception as e:
            err = _engine_error(e)
            if err is None:
                raise
            raise err from None
        finally:
            await _aclose(it)

    async def stream(
        self,
        it: AsyncIterator[GenerationChunk],
        chunk: GenerationChunk,
        fmt: op.CompletionFormat,
        opts: op.StreamOptions | None,
    ) -> AsyncIterator[bytes]:
        continuous = bool(opts and opts.continuous_usage_stats)
        try:
            for head in fmt.head():
                yield _sse(head)
            while True:
                if chunk.text or chunk.finish_reason is not None:
                    usage = _usage(chunk) if continuous else None
                    yield _sse(fmt.chunk(chunk.text, chunk.finish_reason, usage))
                if chunk.finish_reason is not None:
                    break
                nxt = await anext(it, None)
                if nxt is None:
                    break
                chunk = nxt
            if opts is not None and opts.include_usage:
                yield _sse(fmt.usage_chunk(_usage(chunk)))
        except Exception as e:
            err = _engine_error(e)
            if err is None:
                logger.exception("stream failed")
                err = op.OpenAIError(f"internal error: {e}", status=500, type="InternalServerError")
            yield _sse(err.body())
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(it)
        yield SSE_DONE

    async def respond(
        self,
        request: Request,
        req: op.CompletionRequest | op.ChatCompletionRequest,
        ids: list[int],
        fmt: op.CompletionFormat,
    ) -> Response:
        params = self.params(req, len(ids))
        try:
            it, first = await self.start(request, ids, params)
            if req.stream:
                body = self.stream(it, first, fmt, req.stream_options)
                return _SSEResponse(body, media_type="text/event-stream")
            text, last = await self.collect(request, it, first)
        except _ClientGone:
            return Response(status_code=499)
        return _json(fmt.response(text, last.finish_reason or "stop", _usage(last)))

    # -- routes ---------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self.check_auth(request)
        req = op.decode_request(await request.body(), op.CompletionRequest)
        self.check_model(req.model)
        ids = self.prompt_ids(op.completion_prompt(req))
        return await self.respond(request, req, ids, op.CompletionFormat(self.model_name))

    async def chat_completions(self, request: Request) -> Response:
        self.check_auth(request)
        req = op.decode_request(await request.body(), op.ChatCompletionRequest)
        self.check_model(req.model)
        ids = self.chat_ids(op.chat_messages(req))
        return await self.respond(request, req, ids, op.ChatFormat(self.model_name))

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        card = op.ModelCard(self.model_name, self.created, self.max_model_len)
        return _json(op.ModelList([card]))

    async def health(self) -> Response:
        if self.engine.healthy:
            return Response(status_code=200)
        error = getattr(self.engine, "error", None)
        msg = f"the engine is not running: {error}" if error else "the engine is not running"
        err = op.OpenAIError(msg, status=503, type="ServiceUnavailableError")
        return _json(err.body(), 503)

    async def metrics(self) -> Response:
        return Response(self.engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_openai(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, op.OpenAIError)
        return _json(exc.body(), exc.status, exc.headers)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        err = op.OpenAIError(str(exc.detail), status=exc.status_code, type=kind)
        return _json(err.body(), exc.status_code, dict(exc.headers or {}))

    async def on_validation(_: Request, exc: Exception) -> Response:
        return _json(op.OpenAIError(f"invalid request: {exc}").body(), 400)

    async def on_other(_: Request, exc: Exception) -> Response:
        err = op.OpenAIError(f"internal error: {exc}", status=500, type="InternalServerError")
        return _json(err.body(), 500)

    app.add_exception_handler(op.OpenAIError, on_openai)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_other)


def build_app(
    engine: Engine,
    tokenizer: Any,
    *,
    served_model_name: str,
    max_model_len: int,
    api_key: str | None = None,
    version: str,
    vocab_size: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app; ``vocab_size`` bounds prompt token ids (default: the
    tokenizer's size, unchecked without a tokenizer)."""
    server = _OpenAIServer(
        engine,
        tokenizer,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        api_key=api_key,
        vocab_size=vocab_size,
    )
    app = FastAPI(title="outrider", version=version)
    _install_error_handlers(app)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])

    async def version_route() -> Response:
        return _json({"version": version})

    app.add_api_route("/version", version_route, methods=["GET"])
    return app
