"""OpenAI-compatible HTTP API over the engine (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` → server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
Extensions beyond OpenAI's parameters (as in vLLM): ``top_k``, ``ignore_eos``, ``stop_token_ids``.

The engine runs on its own thread; a handler submits its request(s) and awaits their events on an asyncio
queue fed from the engine thread. Requests beyond the cache rows wait in the engine's queue. A client that
goes away (stream closed, or connection dropped while waiting) has its requests cancelled, freeing rows.

Errors are 4xx with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: invalid JSON (also
nesting too deep to parse, or text with a lone UTF-16 surrogate), missing or mistyped fields, out-of-range
sampling parameters, prompts or max_tokens past the context, unknown model (404), bad API key (401), a body over
``max_body_bytes`` (413, answered from its Content-Length before it is read), full queue (429). An engine error
while admitting a request fails that request only (500); the others keep streaming.

With an API key, every route but ``/health`` needs it (``/metrics`` too), and the interactive docs
(``/docs``, ``/redoc``, ``/openapi.json``) are off. Tokenising runs on a worker thread, never on the event loop,
and a text longer than the context could hold (``max_len`` × the longest token's characters) is refused
before it is tokenised.

Chats use the DeepSeek-V3.1 format (``dsv3_jax/serving/chat.py``): the prompt renders with the tokenizer's
``chat_template`` (``tokenizer_config.json`` beside ``tokenizer.json``) or the built-in V3.1 layout, with ``tools``
and in the mode of ``chat_template_kwargs: {"thinking": bool}``; the output splits into ``reasoning_content``,
``content`` and ``tool_calls`` (finish_reason ``tool_calls``), in streamed deltas too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3_jax.data.chat_format import ChatFormatError
from dsv3_jax.serving import chat as chatfmt
from dsv3_jax.serving.engine import Engine, EngineBusy, Event
from dsv3_jax.serving.sampling import RequestError, SamplingParams

MAX_BODY_BYTES = 8 * 2**20  # default request-body limit (413 beyond it)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ----------------------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool | None = False


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if any(part.get("type") != "text" for part in content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in content)
    return content or ""


def _unicode(text: str, param: str) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (JSON ``"\\ud800"``) → 400 (tokenizers reject it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: the text holds a lone UTF-16 surrogate at character {e.start} "
                            f"(not valid Unicode)", param=param, code="invalid_value") from None
    return text


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token decodes to (special tokens included), or None if the tokenizer cannot say:
    a text of n characters has at least n / this many tokens, so longer texts can be refused untokenised."""
    n = getattr(tokenizer, "vocab_size", None)
    if not isinstance(n, int) or n <= 0:
        return None
    return max(1, max(len(tokenizer.decode([i])) for i in range(n)))


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def create_app(engine: Engine, tokenizer: Any, model_name: str, api_key: str | None = None,
               chat_template: str | None = None, add_bos: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving ``engine`` as ``model_name``; starts the engine thread on startup if it is not running.

    ``add_bos`` prepends BOS to completion prompts (HF tokenizers that ask for it via ``add_bos_token``);
    ``max_body_bytes`` bounds a request body (413 beyond it).
    """
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes={max_body_bytes}: must be positive")
    per_token = max_token_chars(tokenizer)
    max_chars = None if per_token is None else engine.max_len * per_token

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        started = not engine.running
        engine.start()
        yield
        if started:
            engine.stop()

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="dsv3-jax", lifespan=lifespan, **docs)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.running else "stopped", "model": model_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsv3-jax", "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionBody)
        if body.echo or body.logprobs is not None:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        for text in [body.prompt] if isinstance(body.prompt, str) else body.prompt:
            if isinstance(text, str):
                _check_chars(len(text), "prompt")
        prompts = await asyncio.to_thread(_completion_prompts, body.prompt, tokenizer, add_bos)
        params = _sampling(body, body.max_tokens if body.max_tokens is not None else 16, None)
        return await _run(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatBody)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        _check_chars(sum(len(_text_of(m.content)) for m in body.messages), "messages")
        try:
            thinking = chatfmt.thinking_of(body.chat_template_kwargs)
            tools = chatfmt.tools_for(body.tools, body.tool_choice)
            for i, m in enumerate(body.messages):
                _unicode(_text_of(m.content), f"messages.{i}.content")
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
        except (ChatFormatError, ValueError) as e:
            raise APIError(400, str(e), param="messages" if isinstance(e, ChatFormatError) else None) from None

        def tokenize() -> list[int]:
            try:
                return chatfmt.chat_prompt(messages, tokenizer, tools, thinking, chat_template)
            except (ChatFormatError, ValueError) as e:
                raise APIError(400, str(e), param="messages" if isinstance(e, ChatFormatError) else None) from None

        ids = await asyncio.to_thread(tokenize)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _sampling(body, limit, len(ids))
        parser = chatfmt.OutputParser(thinking, tools=bool(tools))
        return await _run(request, body, [ids], params, chat=True, parsers=[parser])

    def _check_chars(n: int, param: str) -> None:
        if max_chars is not None and n > max_chars:
            raise APIError(400, f"{param}: {n} characters cannot fit this server's context of {engine.max_len} "
                                f"tokens (a token is at most {per_token} characters): shorten the prompt",
                           param=param, code="context_length_exceeded")

    def _too_large(size: str) -> APIError:
        return APIError(413, f"the request body is {size} bytes; this server accepts at most {max_body_bytes} "
                             "(serve.py --max-body-bytes)", code="request_too_large")

    async def _read_body(request: Request) -> bytes:
        """The body, refused (413) from its Content-Length before reading, or as soon as it passes the limit."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _too_large(f"more than {max_body_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(request: Request, model: type[_Body]) -> Any:
        raw = await _read_body(request)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param,
                           code="missing_field" if err["type"] == "missing" else "invalid_type") from None
        if body.model != model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n}: only n=1 is supported", param="n", code="invalid_value")
        return body

    def _sampling(body: _Body, max_tokens: int | None, prompt_len: int | None) -> SamplingParams:
        if max_tokens is None:  # chat without a limit: fill the context
            max_tokens = max(engine.max_len - (prompt_len or 0), 1)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed, stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos))

    async def _run(request: Request, body: _Body, prompts: list[list[int]], params: SamplingParams,
                   chat: bool, parsers: list[chatfmt.OutputParser] | None = None) -> Response:
        for p in prompts:
            _check(p, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        ids: list[str] = []
        try:
            for i, p in enumerate(prompts):
                def on_event(ev: Event, i: int = i) -> None:  # engine thread → event loop
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

                ids.append(engine.submit(p, params, on_event, request_id=f"{rid}-{i}"))
        except RequestError as e:
            for r in ids:
                engine.cancel(r)
            raise _as_api_error(e) from None
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        done = [False] * len(ids)

        def cancel_unfinished() -> None:
            for r, d in zip(ids, done, strict=True):
                if not d:
                    engine.cancel(r)

        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _CleanupStream(_sse(queue, done, meta, parsers, usage, [len(p) for p in prompts]),
                                  cancel_unfinished)
        try:
            result = await _collect(request, queue, done, meta, parsers, [len(p) for p in prompts])
        finally:
            cancel_unfinished()
        return Response(status_code=499) if result is None else JSONResponse(result)

    def _check(prompt: list[int], params: SamplingParams) -> None:
        try:
            engine.check(prompt, params)
        except RequestError as e:
            raise _as_api_error(e) from None

    async def _collect(request: Request, queue: asyncio.Queue, done: list[bool], meta: dict,
                       parsers: list[chatfmt.OutputParser] | None, prompt_lens: list[int]) -> dict[str, Any] | None:
        """Wait for every prompt's last event → the response body (None if the client went away)."""
        n = len(done)
        texts, reasons, counts = [""] * n, [""] * n, [0] * n
        while not all(done):
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            texts[i] += ev.text
            counts[i] = ev.completion_tokens
            reasons[i] = ev.finish_reason or ""
            done[i] = ev.finish_reason is not None
        if "error" in reasons or "cancelled" in reasons:
            raise APIError(500, "generation failed on the server; see its log", "server_error")
        if parsers:
            choices = [{"index": i, "message": chatfmt.message(p.feed(t) + p.finish(), p.thinking),
                        "finish_reason": chatfmt.finish_reason(r, p)}
                       for i, (t, r, p) in enumerate(zip(texts, reasons, parsers, strict=True))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        choices = [c | {"logprobs": None} for c in choices]
        return {**meta, "object": "chat.completion" if parsers else "text_completion", "choices": choices,
                "usage": _usage(sum(prompt_lens), sum(counts))}

    async def _sse(queue: asyncio.Queue, done: list[bool], meta: dict, parsers: list[chatfmt.OutputParser] | None,
                   include_usage: bool, prompt_lens: list[int]) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if parsers else "text_completion"
        counts = [0] * len(done)

        def chunk(i: int, text: str | None, reason: str | None, delta: dict[str, Any] | None = None) -> str:
            if parsers:
                choice = {"index": i, "delta": delta or {}, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        if parsers:
            for i in range(len(done)):
                yield chunk(i, None, None, {"role": "assistant", "content": ""})
        while not all(done):
            i, ev = await queue.get()
            counts[i] = ev.completion_tokens
            done[i] = ev.finish_reason is not None
            if ev.finish_reason in ("cancelled", "error"):
                error = {"message": f"generation {ev.finish_reason} on the server", "type": "server_error",
                         "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            elif parsers:  # reasoning / content / tool-call deltas, then the finish reason on its own
                p = parsers[i]
                for d in p.feed(ev.text) + (p.finish() if ev.finish_reason else []):
                    yield chunk(i, None, None, d.openai())
                if ev.finish_reason:
                    yield chunk(i, None, chatfmt.finish_reason(ev.finish_reason, p))
            elif ev.text or ev.finish_reason:
                yield chunk(i, ev.text, ev.finish_reason)
        if include_usage:
            last = {**meta, "object": obj, "choices": [], "usage": _usage(sum(prompt_lens), sum(counts))}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    return app


class _CleanupStream(StreamingResponse):
    """A server-sent-event stream that runs ``on_close`` however it ends: finished, or the client went away
    (a failed send, or the disconnect listener of older ASGI versions, ends the response early)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _as_api_error(e: RequestError) -> APIError:
    if isinstance(e, EngineBusy):
        return APIError(429, e.message, "rate_limit_error", e.param, e.code)
    return APIError(400, e.message, "invalid_request_error", e.param, e.code)


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Any,
                        add_bos: bool) -> list[list[int]]:
    """A completion's prompt field → token ids per prompt (text may contain special tokens, e.g. FIM)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return [bos + tokenizer.encode(_unicode(p, "prompt"), allow_special=True) if isinstance(p, str) else list(p)
            for p in prompt]


def prometheus_text(stats: dict[str, float]) -> str:
    """Engine stats in the Prometheus text exposition format."""
    help_ = {
        "requests_total": ("counter", "Requests accepted into the engine."),
        "requests_cancelled_total": ("counter", "Requests cancelled (client went away)."),
        "generated_tokens_total": ("counter", "Tokens generated."),
        "tokens_per_second": ("gauge", "Generated tokens per second over the last 10 s."),
        "queue_depth": ("gauge", "Requests waiting for a cache row."),
        "cache_slots_used": ("gauge", "Cache rows holding a request."),
        "cache_slots_total": ("gauge", "Cache rows."),
        "steps_total": ("counter", "Decode steps run."),
        "spec_drafted_total": ("counter", "MTP draft tokens proposed."),
        "spec_accepted_total": ("counter", "MTP draft tokens accepted."),
        "spec_acceptance_rate": ("gauge", "Accepted / proposed MTP draft tokens."),
    }
    lines = []
    for key, value in stats.items():
        kind, text = help_.get(key, ("gauge", key))
        lines += [f"# HELP dsv3_{key} {text}", f"# TYPE dsv3_{key} {kind}", f"dsv3_{key} {float(value):g}"]
    return "\n".join(lines) + "\n"
