"""`llama2 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with dynamic batching.

    llama2 serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                 [--max-batch-size 16] [--max-queue 64] [--default-system-prompt]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (the
only one without the API key). Chat messages are put in the Llama 2 chat format here, on the
server, and a message of any role that carries one of its tags ([INST], [/INST], <<SYS>>,
<</SYS>>) is refused with a 400 naming `messages[i].content` (code "special_tag"), as Meta's
chat_completion refuses it; /v1/completions keeps its prompt as given. A chat reply ends
where the model starts writing a tag (an implicit stop string). Concurrent requests share
`respond` calls (see batcher.py, which also says how `seed` behaves in a batch). Errors use
OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2.chat import (
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TAGS,
    DialogError,
    SpecialTagError,
    check_special_tags,
    encode_prompt,
    with_system,
)
from llama2.checkpoint import Loaded
from llama2.serve.batcher import Batcher, Event, Job, QueueFull, Sink

log = logging.getLogger("llama2.serve")

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 200
MAX_N = 8
DISCONNECT_POLL_S = 0.5
INLINE_ENCODE_CHARS = 4096  # shorter prompts are tokenized on the event loop (cheap enough)


@dataclass
class ServeConfig:
    model_name: str
    model_aliases: tuple[str, ...] = ()  # other names accepted in a request's `model` field
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1_000_000
    batch_wait_ms: float = 20.0
    default_system_prompt: bool = False


# ---------------------------------------------------------------------------------- errors
class APIError(Exception):
    """Any error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers = param, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors as one readable line, e.g. "max_tokens: Input should be ... (got -5)"."""
    parts, param = [], None
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        # Union members show up in loc as type names ("str", "list[str]"): keep the field path.
        loc = ".".join(p for p in loc.split(".") if not p.startswith(("str", "list[", "int")))
        param = param or loc or None
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(
            err["input"], (dict, list)) else ""
        parts.append(f"{loc + ': ' if loc else ''}{err['msg']}{got}")
    return "; ".join(parts), param


# ---------------------------------------------------------------------------------- schemas
class _Request(BaseModel):
    # Unknown fields (presence_penalty, user, logit_bias, ...) are accepted and ignored, as
    # clients send them routinely.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extra (vLLM's): 0 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings (got "
                           f"{len(stops)})", param="stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: stop strings must be 1 to {MAX_STOP_CHARS} characters",
                           param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str  # checked by chat.normalize, whose DialogError names the turn and the role
    content: str | list[_TextPart] | None = None

    def text(self, i: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise APIError(400, f"messages.{i}.content: a message needs text content",
                           param=f"messages.{i}.content")
        if any(p.type != "text" or p.text is None for p in self.content):
            raise APIError(400, f"messages.{i}.content: only text parts are supported",
                           param=f"messages.{i}.content")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    # An extra: put chat.DEFAULT_SYSTEM_PROMPT first when the dialog has no system message.
    # null = the server's --default-system-prompt setting.
    use_default_system_prompt: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)


# ---------------------------------------------------------------------------------- the app
class Server:
    """The routes' shared state: model, tokenizer, batcher and settings."""

    def __init__(self, loaded: Loaded, config: ServeConfig):
        if loaded.tokenizer is None:
            raise ValueError("the server needs a tokenizer")
        self.model, self.tok, self.config = loaded.model, loaded.tokenizer, config
        self.ctx = loaded.model.args.max_seq_len
        self.batcher = Batcher(self.model, self.tok, config.max_batch_size, config.max_queue,
                              config.batch_wait_ms / 1000)

    # ----------------------------------------------------------------- request checks
    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        # Constant-time comparison: the key is not revealed by response timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request, schema: type[BaseModel]) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        # Refuse a declared-huge body before reading any of it, and cap a chunked one as it comes.
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"request body is {length} bytes; the limit is {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, code="invalid_value", param=param) from None

    def check_model(self, name: str | None) -> str:
        cfg = self.config
        if name and name != cfg.model_name and name not in cfg.model_aliases:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{cfg.model_name!r}", code="model_not_found", param="model")
        return cfg.model_name

    def budget(self, req: _Request, prompt_len: int) -> int:
        """max_tokens for a prompt, or a 400 that names the problem."""
        if prompt_len >= self.ctx:
            raise APIError(400, f"prompt is {prompt_len} tokens; the context is {self.ctx} "
                           "(it must leave room for at least one new token)",
                           code="context_length_exceeded",
                           param="messages" if isinstance(req, ChatRequest) else "prompt")
        asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if asked is None:
            return self.ctx - prompt_len  # as OpenAI: the rest of the context
        if prompt_len + asked > self.ctx:
            raise APIError(400, f"prompt is {prompt_len} tokens and max_tokens is {asked}: "
                           f"{prompt_len + asked} tokens, more than the context of {self.ctx}",
                           code="context_length_exceeded", param="max_tokens")
        return asked

    # ----------------------------------------------------------------- jobs
    def make_jobs(self, req: _Request, prompts: list[list[int]], sink: Sink) -> list[Job]:
        stops = req.stop_list()
        chat = isinstance(req, ChatRequest)
        if chat:  # a chat tag starts a new turn: the reply ends there
            stops += [t for t in SPECIAL_TAGS if t not in stops]
        jobs = []
        for p, prompt in enumerate(prompts):
            max_tokens = self.budget(req, len(prompt))
            for k in range(req.n):
                # n > 1 with a seed: each choice its own seed, else they would all be equal.
                seed = None if req.seed is None else req.seed + k
                jobs.append(Job(prompt, max_tokens, req.temperature, req.top_p, req.top_k, stops,
                                seed, sink, index=p * req.n + k,
                                format="chat" if chat else "text"))
        return jobs

    def submit(self, jobs: list[Job]) -> None:
        if len(jobs) > self.batcher.max_queue:  # would never fit: a retry cannot help
            raise APIError(400, f"this request needs {len(jobs)} completions; the server queues "
                           f"at most {self.batcher.max_queue}", param="n")
        try:
            self.batcher.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None


async def _events(request: Request, queue: asyncio.Queue, n: int) -> AsyncIterator[Event]:
    """A request's events until all `n` choices are done; polls for a client that went away."""
    left = n
    checked = time.monotonic()
    while left:
        # Events may flow without a pause for a long time: look for a gone client by the clock.
        if time.monotonic() - checked > DISCONNECT_POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                return
        try:
            event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue
        # Take whatever else is ready and merge a choice's consecutive deltas: a slow reader
        # gets fewer, larger chunks instead of an ever longer backlog.
        events = [event]
        while not queue.empty():
            e = queue.get_nowait()
            last = events[-1]
            if e[0] == "delta" and last[0] == "delta" and last[1] == e[1]:
                events[-1] = ("delta", e[1], last[2] + e[2])
            else:
                events.append(e)
        for e in events:
            if e[0] in ("done", "error"):
                left -= 1
            yield e


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def create_app(loaded: Loaded, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `loaded` (whose path is never taken from a request)."""
    server = Server(loaded, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.batcher.close()

    app = FastAPI(title="llama2", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, type_=type_).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return APIError(400, message, code="invalid_value", param=param).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error: {type(e).__name__}", type_="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = server.batcher
        return {"status": "ok", "model": config.model_name, "queued": len(b.queue),
                "running": b.running, **b.stats}

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "llama2",
                "context_length": server.ctx}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict[str, Any]:
        server.check_auth(request)
        server.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        server.check_auth(request)
        req: ChatRequest = await server.read_json(request, ChatRequest)
        name = server.check_model(req.model)
        dialog = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        try:  # before a default system message is put first, so the index is the client's
            check_special_tags(dialog)
        except SpecialTagError as e:
            param = f"messages[{e.index}].content"
            raise APIError(400, f"{param}: {e}", code="special_tag", param=param) from None
        use_default = req.use_default_system_prompt
        if use_default is None:
            use_default = config.default_system_prompt
        if use_default and dialog[0]["role"] != "system":
            dialog = with_system(dialog, DEFAULT_SYSTEM_PROMPT)
        try:  # a long prompt takes a while to tokenize: off the event loop then
            if sum(len(m["content"]) for m in dialog) > INLINE_ENCODE_CHARS:
                prompt = await run_in_threadpool(encode_prompt, server.tok, dialog)
            else:
                prompt = encode_prompt(server.tok, dialog)
        except DialogError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        # The answer is decoded alone, as Meta's chat_completion does (no leading space).
        return await _complete(request, server, req, name, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        server.check_auth(request)
        req: CompletionRequest = await server.read_json(request, CompletionRequest)
        name = server.check_model(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(texts) * req.n > MAX_N:
            raise APIError(400, f"prompts x n is {len(texts) * req.n}; at most {MAX_N} per request",
                           param="prompt")
        if sum(len(t) for t in texts) > INLINE_ENCODE_CHARS:
            prompts = await run_in_threadpool(server.tok.encode_batch, texts, True)
        else:
            prompts = server.tok.encode_batch(texts, True)
        # A completion is decoded after its prompt's last tokens (its leading space survives).
        return await _complete(request, server, req, name, prompts, chat=False)

    return app


async def _complete(request: Request, server: Server, req: _Request, name: str,
                    prompts: list[list[int]], chat: bool) -> Any:
    """Queue the jobs, then answer with one JSON body or a stream of server-sent events."""
    queue: asyncio.Queue = asyncio.Queue()
    jobs = server.make_jobs(req, prompts, Sink(asyncio.get_running_loop(), queue))
    server.submit(jobs)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    n = len(jobs)
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": name}

    if req.stream:
        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if not chat:
                return {**head, "choices": [{"index": index, "text": text or "", "logprobs": None,
                                             "finish_reason": reason}]}
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                         "finish_reason": reason}]}

        async def stream() -> AsyncIterator[bytes]:
            completion_tokens = 0
            try:
                if chat:  # OpenAI opens each choice with the role
                    for i in range(n):
                        yield _sse(chunk(i, "", None, role=True))
                async for event in _events(request, queue, n):
                    if event[0] == "delta":
                        yield _sse(chunk(event[1], event[2], None))
                    elif event[0] == "done":
                        completion_tokens += event[3]
                        yield _sse(chunk(event[1], None if chat else "", event[2]))
                    else:
                        yield _sse(APIError(500, event[2], type_="server_error").body())
                if req.include_usage():
                    yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens,
                                                                       completion_tokens)})
                yield _sse("[DONE]")
            finally:
                # Normal end, client gone or task cancelled: either way free the batch rows.
                server.batcher.cancel(jobs)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts = [""] * n
    reasons: list[str | None] = [None] * n
    completion_tokens = 0
    try:
        async for event in _events(request, queue, n):
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                reasons[event[1]] = event[2]
                completion_tokens += event[3]
            else:
                raise APIError(500, event[2], type_="server_error")
    finally:
        server.batcher.cancel(jobs)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    obj = "chat.completion" if chat else "text_completion"
    return {**head, "object": obj, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------- running
class ServerThread:
    """uvicorn in a background thread (tests, the benchmark): `with ServerThread(app) as s:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        # port 0 asks the OS for a free port: read back the one it gave.
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def served_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.is_file() else p.name


@contextlib.contextmanager
def running(loaded: Loaded, **config: Any) -> Iterator[ServerThread]:
    """Serve `loaded` on a free local port for the length of a `with` block."""
    config.setdefault("model_name", "llama2")
    with ServerThread(create_app(loaded, ServeConfig(**config))) as s:
        yield s


def main(argv: list[str] | None = None) -> None:
    from llama2.commands import DTYPES, load_for_inference

    ap = argparse.ArgumentParser(prog="llama2 serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint to serve (any format llama2 loads)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--served-model-name", default=None,
                    help="the `model` name clients use (default: the checkpoint's name)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback only; 0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--api-key", default=os.environ.get("LLAMA2_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' (default: env LLAMA2_API_KEY)")
    ap.add_argument("--max-batch-size", type=int, default=16,
                    help="most requests (choices) run together in one generate call")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="most requests waiting for a batch; past it, 429 with Retry-After")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0,
                    help="how long a lone request waits for others to share its batch")
    ap.add_argument("--max-body-bytes", type=int, default=1_000_000)
    ap.add_argument("--default-system-prompt", action="store_true",
                    help="put Llama 2's default system prompt first in dialogs without one")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 for models under 50M parameters, "
                    "where more threads cost more in synchronization than they save; else torch's)")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    if a.max_batch_size < 1 or a.max_queue < 1 or a.max_body_bytes < 1:
        raise ValueError("--max-batch-size, --max-queue and --max-body-bytes must be positive")
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    loaded = load_for_inference(a.model, a.tokenizer, a.dtype, a.device)
    threads = a.threads or (1 if loaded.args.num_params() < 50e6 else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    name = a.served_model_name or served_name(a.model)
    config = ServeConfig(model_name=name, model_aliases=(a.model,), api_key=a.api_key,
                         max_batch_size=a.max_batch_size, max_queue=a.max_queue,
                         max_body_bytes=a.max_body_bytes, batch_wait_ms=a.batch_wait_ms,
                         default_system_prompt=a.default_system_prompt)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it",
                    a.host)
    import uvicorn

    log.info("serving %r (context %d) on http://%s:%d/v1", name, loaded.args.max_seq_len,
             a.host, a.port)
    # Graceful shutdown waits at most a few seconds for open streams, then cuts them.
    uvicorn.run(create_app(loaded, config), host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
