"""The OpenAI-compatible ASGI app over one `Pipeline`: the same app serves one process or each Ray replica.

Decoding runs on one worker thread per pipeline (the pipeline answers one request at a time), so the
event loop stays free: requests queue in arrival order, streams are fed through an asyncio queue, and
a client that leaves a stream sets a flag the worker checks after every speculation round.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from dream_export.errors import DreamExportError, UsageError
from dream_export.runtime.chat import ContextLengthError
from dream_export.runtime.pipeline import Pipeline, Result, Stream
from dream_export.serve import protocol as proto


@dataclass
class ServeConfig:
    """What a server (or each Ray replica) loads and how it decodes."""

    bundle: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: str = "2"
    mode: str | None = None  # None: the bundle's searched shape, else an EAGLE-2 tree
    tree: str | None = None
    model_name: str | None = None  # the `model` clients name; default: the bundle directory's name
    local_images: Path | None = None  # file:// image URLs are served from under this directory only

    @property
    def name(self) -> str:
        return self.model_name or Path(self.bundle).resolve().name


class Service:
    """One `Pipeline` and the thread that decodes on it."""

    def __init__(self, pipe: Pipeline, config: ServeConfig):
        self.pipe, self.config, self.name = pipe, config, config.name
        self.local_root = Path(config.local_images).resolve() if config.local_images else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="dream-export-decode")
        # served through /health: requests accepted for decoding, still queued or decoding, and streams
        # stopped because their client left
        self.counts = {"requests": 0, "active": 0, "abandoned": 0}
        self._count_lock = threading.Lock()

    def _count(self, **delta: int) -> None:
        with self._count_lock:
            for k, v in delta.items():
                self.counts[k] += v

    def _submit(self, fn):
        """Run `fn` on the decode thread, counted as active until it returns."""
        self._count(requests=1, active=1)

        def job():
            try:
                return fn()
            finally:
                self._count(active=-1)

        return self._worker.submit(job)

    @classmethod
    def load(cls, config: ServeConfig) -> Service:
        """Load the bundle and answer one short request, so a bad mode/tree or bundle fails at start-up
        and the first client does not pay for the backends' first-call allocations."""
        threads = int(config.threads) if config.threads.isdigit() else config.threads
        svc = cls(Pipeline.load(config.bundle, config.backend, threads, config.precision), config)
        svc.pipe.chat([{"role": "user", "content": "Hello."}], max_new_tokens=2, mode=config.mode,
                      tree=config.tree)
        return svc

    def open(self, req: proto.ChatRequest) -> Stream:
        """Check a request and prepare its answer (decoding starts when the worker iterates it)."""
        limit, cap = req.limit(), self.pipe.kv_capacity
        stream = self.pipe.chat_stream(proto.conversation(req, self.local_root), max_new_tokens=limit or cap,
                                       mode=self.config.mode, tree=self.config.tree, **req.options())
        if limit and stream.prompt_tokens + limit > cap:
            raise ContextLengthError(f"this model's KV capacity is {cap} tokens; the prompt takes "
                                     f"{stream.prompt_tokens} and max_tokens asks for {limit} more")
        return stream

    async def complete(self, stream: Stream) -> Result:
        return await asyncio.wrap_future(self._submit(stream.collect))

    def feed(self, stream: Stream, cancel: threading.Event) -> asyncio.Queue:
        """Decode `stream` on the worker; its ("delta", str), ("done", Result) or ("error", exc) events
        arrive on the returned queue. Setting `cancel` stops it after the current round."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (server shutting down)
                cancel.set()

        def job() -> None:
            try:
                if cancel.is_set():  # the client left while the request was waiting
                    self._count(abandoned=1)
                    return
                for delta in stream:
                    put(("delta", delta))
                    if cancel.is_set():
                        self._count(abandoned=1)
                        return
                put(("done", stream.result))
            except Exception as e:
                put(("error", e))
            finally:
                stream.close()

        self._submit(job)
        return queue


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def _error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(proto.error(message, kind, param, code), status_code=status,
                        headers={proto.REPLICA_HEADER: proto.REPLICA})


def _status(e: Exception) -> tuple[int, str, str | None]:
    """HTTP status, OpenAI error type and code of a failed request."""
    if isinstance(e, ContextLengthError):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(e, UsageError):
        return 400, "invalid_request_error", None
    return 500, "server_error", None


def create_app(service: Service) -> FastAPI:
    """The HTTP app: POST /v1/chat/completions, GET /v1/models, GET /health."""
    app = FastAPI(title="dream-export", docs_url=None, redoc_url=None)
    app.state.service = service
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        loc = ".".join(str(p) for p in errs[0]["loc"] if p != "body") if errs else None
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                        for e in errs[:5])
        return _error_response(400, f"invalid request: {msg}", param=loc or None)

    @app.exception_handler(DreamExportError)
    async def _expected(_req: Request, exc: DreamExportError) -> JSONResponse:
        status, kind, code = _status(exc)
        return _error_response(status, str(exc), kind, code=code)

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.name, "replica": proto.REPLICA, **service.counts}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": started,
                                            "owned_by": "dream-export",
                                            "kv_capacity": service.pipe.kv_capacity}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: proto.ChatRequest, request: Request):
        if req.model and req.model != service.name:
            return _error_response(404, f"model {req.model!r} is not served here (this server serves "
                                        f"{service.name!r})", code="model_not_found", param="model")
        stream = await run_in_threadpool(service.open, req)  # image decoding stays off the event loop
        cid, headers = proto.completion_id(), {proto.REPLICA_HEADER: proto.REPLICA}
        if not req.stream:
            result = await service.complete(stream)
            return JSONResponse(proto.completion(cid, service.name, result), headers=headers)
        cancel = threading.Event()
        events = service.feed(stream, cancel)
        # the first event decides the status: errors before the first token are still a 400
        first = await _first_event(events, request, cancel)
        if first is None:  # the client left while its request waited: the worker skips it
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        return StreamingResponse(_chunks(cid, service.name, first, events, cancel), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    return app


async def _first_event(events: asyncio.Queue, request: Request, cancel: threading.Event) -> tuple | None:
    """The stream's first event, or None (and `cancel` set) if the client disconnects before it."""
    get = asyncio.ensure_future(events.get())
    try:
        while not get.done():
            await asyncio.wait({get}, timeout=0.2)
            if not get.done() and await request.is_disconnected():
                cancel.set()
                return None
        return get.result()
    finally:
        if not get.done():
            get.cancel()
            cancel.set()


async def _chunks(cid: str, model: str, first: tuple, events: asyncio.Queue,
                  cancel: threading.Event) -> AsyncIterator[str]:
    """Server-sent events of one answer; a client that leaves (the generator is closed) sets `cancel`."""
    try:
        yield _sse(proto.chunk(cid, model, {"role": "assistant", "content": ""}))
        kind, value = first
        while True:
            if kind == "delta":
                yield _sse(proto.chunk(cid, model, {"content": value}))
            elif kind == "done":
                yield _sse(proto.chunk(cid, model, {}, proto.FINISH[value.finish_reason], value))
                break
            else:
                _status_code, err_kind, code = _status(value)
                yield _sse(proto.error(str(value), err_kind, code=code))
                break
            kind, value = await events.get()
        yield _sse("[DONE]")
    finally:
        cancel.set()
