"""The embedded engine's OpenAI-compatible routes, as SGLang serves them.

    GET  /v1/models                 {"object": "list", "data": [{"id": <served name>, "object": "model", ...}]}
    GET  /v1/models/{id}            that card, or 404 for another name
    POST /v1/completions            text completion (prompt: text or token ids), echo, log-probs, SSE stream
    POST /v1/chat/completions       chat through the tokenizer's chat template, SSE stream

So the same client code (the ``openai`` package, lm-eval's ``local-completions``) runs against
this CPU engine and against SGLang.  Requests are parsed in ``openai_requests.py`` (what is
accepted, what answers 400) and replies built in ``openai_replies.py``; here they meet the
engine.  Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` for a request the engine refuses (naming the field when one is at
fault), 503 while the engine cannot serve.  The API key is checked before any route runs
(``http_guard.py``), so the ``openai`` client's ``Authorization: Bearer <api_key>`` is all it needs.

A generation runs like ``/generate``'s: queued, batched with the others, abandoned when the
client hangs up — while waiting for a whole reply, or mid-stream (Starlette cancels the stream
and its ``finally`` abandons the generation).  A stream sends, per choice, an opening chunk
(chat: the assistant role; completions with echo: the prompt), then text deltas as tokens
arrive, then a chunk with the finish reason; with ``stream_options.include_usage`` a last chunk
with empty ``choices`` carries the usage; then ``data: [DONE]``.  The deltas add up to exactly
the text a non-streaming request would get (see :class:`openai_replies.StreamedText`).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' ``Request`` annotations at
# runtime, and they are imported inside add_openai_routes (FastAPI is imported only by the server).
import asyncio
import json
import logging
import time
from typing import Callable, Optional

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.embedded import openai_replies as R
from megatron_spin.rollout.embedded.engine import EmbeddedEngine, EngineUnavailable, PendingGeneration
from megatron_spin.rollout.embedded.openai_requests import (OpenAIRequest, OpenAIRequestError, parse_chat,
                                                            parse_completion)
from megatron_spin.rollout.embedded.waiting import CLIENT_GONE, wait_or_abandon

log = logging.getLogger("megatron_spin.embedded")

OWNED_BY = "megatron_spin"


def openai_error(message: str, status: int = 400, param: Optional[str] = None,
                 kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _refusal(exc: Exception):
    """The OpenAI error reply for what ``parse``/``submit`` raised."""
    if isinstance(exc, EngineUnavailable):
        return openai_error(str(exc), 503, kind="service_unavailable")
    return openai_error(str(exc), 400, getattr(exc, "param", None))


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def add_openai_routes(app, engine: EmbeddedEngine, served_model_name: str) -> None:
    """Register the routes above on ``app``; replies name the model ``served_model_name``."""
    from fastapi import Request, Response
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    created = int(time.time())
    card = {"id": served_model_name, "object": "model", "created": created, "owned_by": OWNED_BY,
            "root": served_model_name, "parent": None, "max_model_len": engine.max_length}

    @app.get(P.MODELS)
    async def models():
        return {"object": "list", "data": [card]}

    @app.get(P.MODELS + "/{model:path}")
    async def model(model: str):
        if model != served_model_name:
            return openai_error(f"The model {model!r} does not exist", 404, "model")
        return card

    async def parsed(request: Request, parse: Callable) -> OpenAIRequest:
        raw = await request.body()
        try:
            d = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise OpenAIRequestError(f"{request.url.path}: body is not JSON ({type(exc).__name__})") from None
        # Tokenising and rendering a template take a while: off the event loop.
        return await run_in_threadpool(parse, d, engine.tokenizer, engine.max_length)

    async def serve(request: Request, parse: Callable, build: Callable):
        try:
            req = await parsed(request, parse)
            if req.stream:
                return _stream(engine, req, served_model_name, StreamingResponse)
            pending = engine.submit(req.generate)
            replies = await wait_or_abandon(engine, pending, request.receive)
        except (P.ProtocolError, EngineUnavailable) as exc:
            return _refusal(exc)
        if replies is None:
            log.info("client gone: abandoned an OpenAI request of %d samples", len(req.generate.input_ids) *
                     req.generate.sampling.n)
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(await run_in_threadpool(build, engine.tokenizer, req, replies, served_model_name))

    @app.post(P.COMPLETIONS)
    async def completions(request: Request):
        return await serve(request, parse_completion, R.completion_reply)

    @app.post(P.CHAT_COMPLETIONS)
    async def chat_completions(request: Request):
        return await serve(request, parse_chat, R.chat_reply)


def _stream(engine: EmbeddedEngine, req: OpenAIRequest, model: str, StreamingResponse):
    """Submit ``req`` with a token listener and answer server-sent events as tokens arrive.
    ``submit`` runs here, before the reply starts, so a refused request is still a plain 400."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    pending = engine.submit(req.generate, lambda sample, token: loop.call_soon_threadsafe(
        tokens.put_nowait, (sample, token)))
    return StreamingResponse(_events(engine, req, model, pending, tokens), media_type="text/event-stream")


async def _events(engine: EmbeddedEngine, req: OpenAIRequest, model: str, pending: PendingGeneration,
                  tokens: asyncio.Queue):
    chat = req.route == P.CHAT_COMPLETIONS
    n = req.generate.sampling.n
    samples = len(req.generate.input_ids) * n
    rid = R.reply_id(req)
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}

    def chunk(index: int, text: Optional[str] = None, finish: Optional[str] = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    streams = [R.StreamedText(engine.tokenizer, req.stop) for _ in range(samples)]
    done = asyncio.wrap_future(pending.future)
    try:
        for k in range(samples):  # the opening chunks go out before the first token
            if chat:
                yield chunk(k, role=True)
            elif req.echo_texts is not None:
                yield chunk(k, req.echo_texts[k // n])
        while not done.done():
            getter = asyncio.ensure_future(tokens.get())
            try:
                await asyncio.wait((getter, done), return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            heard = [getter.result()] if getter.done() and not getter.cancelled() else []
            while not tokens.empty():  # the listener's calls run before the future's: none is missed
                heard.append(tokens.get_nowait())
            deltas: dict[int, str] = {}
            for k, token in heard:
                deltas[k] = deltas.get(k, "") + streams[k].push(token)
            for k, text in sorted(deltas.items()):
                if text:
                    yield chunk(k, text)
        replies = engine.replies(pending)
        texts = await asyncio.to_thread(lambda: [R.choice_text(engine.tokenizer, c, req.stop)
                                                 for per_prompt in replies for c in per_prompt])
        for k, ct in enumerate(texts):
            rest = streams[k].finish(ct.text)
            if rest:
                yield chunk(k, rest)
            yield chunk(k, finish=ct.finish_reason)
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": R.usage(req, replies)})
    except Exception as exc:  # the batch failed (e.g. weights released meanwhile): say so in the stream
        log.warning("stream of %s failed: %s", rid, exc)
        yield _sse({"error": {"message": str(exc), "type": type(exc).__name__, "param": None, "code": None}})
    finally:
        if not pending.future.done():  # the client hung up (Starlette cancelled us) or we failed
            engine.abandon(pending)
            log.info("client gone: abandoned a stream of %d samples", samples)
    yield "data: [DONE]\n\n"
