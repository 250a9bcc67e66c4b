"""HTTP server for the embedded engine: SGLang's native routes on FastAPI/uvicorn.

    python -m megatron_spin.rollout.embedded --model-path DIR [--port 30000] [--api-key KEY]
                                             [--served-model-name NAME]

Routes (SGLang's names and fields; ``protocol.py`` holds the records):
  * generation: ``/generate`` (token ids, ``n`` samples, stop tokens and strings, log-probs of
    the output and the prompt, top-k log-probs, weight version per sample);
  * OpenAI-compatible (``openai_api.py``): ``/v1/models``, ``/v1/completions``,
    ``/v1/chat/completions``, with streaming — the model is named ``--served-model-name``;
  * weights: ``/update_weights_from_tensor``, ``/update_weights_from_disk``,
    ``/init_weights_update_group``, ``/update_weights_from_distributed``,
    ``/destroy_weights_update_group``, ``/begin_weight_update``, ``/end_weight_update``,
    ``/update_weight_version``, ``/get_weights_by_name``;
  * control: ``/pause_generation``, ``/continue_generation``, ``/release_memory_occupation``,
    ``/resume_memory_occupation``, ``/flush_cache``;
  * status: ``/health``, ``/health_generate`` (no key needed), ``/model_info``
    (``/get_model_info``), ``/get_weight_version``, ``/get_server_info``.

Binds 127.0.0.1 unless ``--host`` says otherwise.  With an API key every route except the
health checks needs ``Authorization: Bearer <key>`` and answers 401 without it — weight
updates carry pickled tensor handles, which must never be accepted from an unauthenticated
peer.  Bodies are capped at ``--max-request-bytes`` whether or not they declare a length
(``http_guard.py``).  Replies follow SGLang: a request the engine refuses — malformed JSON,
wrong types, token ids outside the vocabulary, bad sampling parameters, too many samples — is
400 ``{"error": {"message": ...}}`` (the OpenAI routes add ``type`` and ``param``, as OpenAI
does) and leaves the engine serving; weight-update failures are
400 ``{"success": false, "message": ...}`` and leave the weights as they were; an engine that
cannot serve (released memory, weights not loaded, shutting down) answers 503; a group join
beyond ``--max-pending-joins`` waiting ones answers 429.  Only a failure of the engine itself
is a 5xx.

A generation whose client hangs up is abandoned: the handler waits for the batch without
holding a thread and watches the connection; when it closes, the request leaves the queue or
its rows stop at the next decode step, so the next request is served at once.  SIGTERM stops
the server: it stops accepting, gives requests in flight ``SHUTDOWN_GRACE_S`` to finish,
abandons the rest and exits.
"""



import argparse
import json
import logging
import os
import sys
from typing import Optional

import torch

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.embedded.engine import EmbeddedEngine, EngineUnavailable
from megatron_spin.rollout.embedded.group_joins import JoinFailed, JoinPolicy, JoinsBusy
from megatron_spin.rollout.embedded.http_guard import RequestGuard
from megatron_spin.rollout.embedded.openai_api import add_openai_routes
from megatron_spin.rollout.embedded.waiting import CLIENT_GONE, wait_or_abandon
from megatron_spin.wire.tensor_payload import PayloadError

log = logging.getLogger("megatron_spin.embedded")


MAX_REQUEST_BYTES = 64 * 1024**2  # tensor payloads carry handles, not data: requests stay small
SHUTDOWN_GRACE_S = 3  # after SIGTERM: how long requests in flight may take before they are abandoned


def build_app(engine: EmbeddedEngine, api_key: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
              served_model_name: Optional[str] = None):
    """The FastAPI app serving ``engine``; the OpenAI routes name the model ``served_model_name``
    (default: the model path, as SGLang's ``--served-model-name``)."""
    from fastapi import FastAPI, Request, Response
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI(title="megatron_spin embedded engine", docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, api_key=api_key, max_bytes=max_request_bytes,
                       open_routes=P.UNAUTHENTICATED_ROUTES)

    async def body(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise P.ProtocolError(f"{request.url.path}: body is not JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(d, dict):
            raise P.ProtocolError(f"{request.url.path}: body must be a JSON object")
        return d

    def error(exc: Exception, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc)}}, status_code=status)

    def update_reply(ok: bool, message: str, status: int = 200) -> JSONResponse:
        return JSONResponse({"success": ok, "message": message, "weight_version": engine.weight_version},
                            status_code=status)

    async def run_update(request: Request, parse, fn) -> JSONResponse:
        """The weight routes: parse the body into ``fn``'s arguments (a bad body is a 400 naming
        the route), run ``fn`` off the event loop, answer SGLang's ``{"success", "message"}``."""
        try:
            args = parse(await body(request))
        except P.ProtocolError as exc:
            return update_reply(False, str(exc), 400)
        except (KeyError, ValueError, TypeError) as exc:
            return update_reply(False, f"{request.url.path}: bad request ({exc!r})", 400)
        try:
            message = await run_in_threadpool(fn, *args)
        except JoinsBusy as exc:
            return update_reply(False, str(exc), 429)
        except (PayloadError, P.ProtocolError, JoinFailed, ValueError, TypeError) as exc:
            # JoinFailed: the group's other members did not come; SGLang answers a failed join 400 too.
            log.warning("rejected weight update: %s", exc)
            return update_reply(False, str(exc), 400)
        except Exception as exc:  # e.g. a broadcast that timed out: report it, keep serving
            log.exception("weight update failed")
            return update_reply(False, f"{type(exc).__name__}: {exc}", 500)
        return update_reply(True, message)

    @app.exception_handler(P.ProtocolError)
    async def protocol_error(request: Request, exc: P.ProtocolError):
        return error(exc)

    @app.get(P.HEALTH)
    @app.get(P.HEALTH_GENERATE)
    async def health():
        # SGLang's /health generates a token, so it fails while generation is paused: as here.
        if engine.paused:
            return PlainTextResponse("generation is paused", status_code=503)
        if engine.weights.released or engine.weights.unloaded:
            return PlainTextResponse("weights not loaded", status_code=503)
        return PlainTextResponse("ok")

    @app.get(P.MODEL_INFO)
    @app.get(P.MODEL_INFO_OLD)
    async def model_info():
        return {"model_path": engine.model_path, "is_generation": True, "weight_version": engine.weight_version}

    @app.get("/get_server_info")
    async def server_info():
        return {"engine": "megatron_spin.embedded", **engine.info()}

    @app.get(P.WEIGHT_VERSION)
    async def weight_version():
        return {"weight_version": engine.weight_version}

    async def answer(request: Request, req: P.GenerateRequest) -> Optional[list[list[P.Completion]]]:
        """The replies to ``req``, or None if the client hung up first (its work is abandoned)."""
        pending = engine.submit(req)
        replies = await wait_or_abandon(engine, pending, request.receive)
        if replies is None:
            log.info("client gone: abandoned a request of %d samples", len(req.input_ids) * req.sampling.n)
        return replies

    @app.post(P.GENERATE)
    async def generate(request: Request):
        try:
            replies = await answer(request, P.GenerateRequest.from_json(await body(request)))
        except P.ProtocolError as exc:
            return error(exc)
        except EngineUnavailable as exc:
            return error(exc, 503)
        if replies is None:
            return Response(status_code=CLIENT_GONE)
        flat = [c.to_json() for per_prompt in replies for c in per_prompt]
        return flat[0] if len(flat) == 1 else flat

    add_openai_routes(app, engine, served_model_name or engine.model_path)

    @app.api_route(P.FLUSH_CACHE, methods=["GET", "POST"])
    async def flush_cache():
        return PlainTextResponse("Cache flushed (the embedded engine keeps no cache between batches).")

    def model_path(d: dict) -> tuple:
        if not isinstance(d.get("model_path"), str):
            raise P.ProtocolError(f"{P.UPDATE_FROM_DISK}: missing required field 'model_path'")
        return d["model_path"], d.get("weight_version")

    group = "weight_update_group"  # SGLang's default group name
    routes = {
        P.UPDATE_FROM_TENSOR: (lambda d: (d.get("serialized_named_tensors"), d.get("load_format"),
                                          d.get("weight_version")), engine.update_from_tensor),
        P.UPDATE_FROM_DISK: (model_path, engine.update_from_disk),
        P.INIT_UPDATE_GROUP: (lambda d: (_string(d, "master_address"), _integer(d, "master_port"),
                                         _integer(d, "rank_offset"), _integer(d, "world_size"),
                                         _string(d, "group_name", group), _string(d, "backend", "gloo")),
                              engine.init_update_group),
        P.DESTROY_UPDATE_GROUP: (lambda d: (str(d.get("group_name", group)),), engine.destroy_update_group),
        P.UPDATE_FROM_DISTRIBUTED: (lambda d: (list(d["names"]), list(d["dtypes"]), [list(x) for x in d["shapes"]],
                                               str(d.get("group_name", group)), d.get("weight_version")),
                                    engine.update_from_distributed),
    }
    def update_handler(parse, fn):
        async def handler(request: Request):  # only ``request`` in the signature: FastAPI reads it
            return await run_update(request, parse, fn)

        return handler

    for route, (parse, fn) in routes.items():
        app.add_api_route(route, update_handler(parse, fn), methods=["POST"], name=route.strip("/"))

    @app.post(P.UPDATE_WEIGHT_VERSION)
    async def update_weight_version(request: Request):
        try:
            d = await body(request)
        except P.ProtocolError as exc:
            return update_reply(False, str(exc), 400)
        if d.get("new_version") is None:
            return update_reply(False, f"{P.UPDATE_WEIGHT_VERSION}: missing 'new_version'", 400)
        try:
            await run_in_threadpool(engine.set_weight_version, d["new_version"])
        except P.ProtocolError as exc:
            return update_reply(False, str(exc), 400)
        return {"success": True, "message": "ok", "new_version": engine.weight_version}

    async def session(fn) -> JSONResponse:
        try:
            return JSONResponse({"success": True, "message": await run_in_threadpool(fn)})
        except P.ProtocolError as exc:  # SGLang: 400 {"success": false, "message": ...}
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)

    @app.post(P.BEGIN_WEIGHT_UPDATE)
    async def begin_weight_update():
        return await session(engine.begin_weight_update)

    @app.post(P.END_WEIGHT_UPDATE)
    async def end_weight_update():
        return await session(engine.end_weight_update)

    @app.api_route(P.GET_WEIGHTS_BY_NAME, methods=["GET", "POST"])
    async def get_weights_by_name(request: Request):
        try:
            d = await body(request)
            return await run_in_threadpool(engine.get_weights_by_name, _string(d, "name"),
                                           _integer(d, "truncate_size", 100))
        except (P.ProtocolError, ValueError, TypeError) as exc:
            return error(exc)

    @app.post(P.PAUSE)
    async def pause():
        engine.pause()
        return {"message": "Generation paused.", "status": "ok"}

    @app.post(P.CONTINUE)
    async def continue_generation():
        engine.continue_generation()
        return {"message": "Generation continued.", "status": "ok"}

    async def memory(request: Request, fn):
        try:
            tags = (await body(request)).get("tags")
            if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                raise P.ProtocolError(f"{request.url.path}: 'tags' must be a list of strings or null")
            await run_in_threadpool(fn, tags)
        except P.ProtocolError as exc:
            return error(exc)
        return None

    @app.api_route(P.RELEASE_MEMORY, methods=["GET", "POST"])
    async def release_memory(request: Request):
        return await memory(request, engine.release_memory)

    @app.api_route(P.RESUME_MEMORY, methods=["GET", "POST"])
    async def resume_memory(request: Request):
        return await memory(request, engine.resume_memory)

    return app


def _string(d: dict, key: str, default: Optional[str] = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise P.ProtocolError(f"field {key!r} must be a string, got {value!r}"[:200])
    return value


def _integer(d: dict, key: str, default: Optional[int] = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise P.ProtocolError(f"field {key!r} must be an integer, got {value!r}"[:200])
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_spin.rollout.embedded",
                                     description="Serve an HF model with SGLang's HTTP API on the CPU.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--fd", type=int, default=None,
                        help="serve on this inherited, already bound socket (the launcher's; --host/--port describe it)")
    parser.add_argument("--api-key", default=os.environ.get("MEGATRON_SPIN_ENGINE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (also read from MEGATRON_SPIN_ENGINE_API_KEY, "
                             "so it need not appear in the process list)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name on the OpenAI routes (/v1/models; default: --model-path, as SGLang)")
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help="largest request body, with or without a Content-Length (413 beyond)")
    parser.add_argument("--max-pending-joins", type=int, default=JoinPolicy.max_pending,
                        help="weight-update group joins that may wait for their peers at once (429 beyond)")
    parser.add_argument("--join-timeout-s", type=float, default=JoinPolicy.timeout_s,
                        help="how long a group join waits for the other members")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cuda: the GPU check)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device-ids", default=None,
                        help="simulate TP ranks holding these (comma-separated) devices: a tensor update needs one "
                             "payload per rank, each from that rank's device (device-locality tests on the CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s embedded-engine %(levelname)s %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without an API key: anyone who can reach it can replace the weights", args.host)
    if args.threads:
        torch.set_num_threads(args.threads)
    joins = JoinPolicy.for_host(args.host, max_pending=args.max_pending_joins, timeout_s=args.join_timeout_s)
    engine = EmbeddedEngine.load(args.model_path, device=args.device, dtype=args.dtype,
                                 weight_version=args.weight_version, max_batch_tokens=args.max_batch_tokens,
                                 device_ids=args.device_ids.split(",") if args.device_ids else None, joins=joins)
    import uvicorn

    # SIGTERM: uvicorn stops accepting and waits for the requests in flight — without a bound, for
    # a long generation or a group join waiting for its peers.  After the grace their tasks are
    # cancelled (which abandons their generations), and uvicorn ends the process with the signal.
    config = uvicorn.Config(build_app(engine, args.api_key, args.max_request_bytes, args.served_model_name), host=args.host,
                            port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = uvicorn.Server(config)
    try:
        if args.fd is not None:
            import socket

            sock = socket.socket(fileno=args.fd)
            sock.listen(128)
            server.run(sockets=[sock])
        else:
            server.run()
    finally:
        engine.shutdown()
    return 0
