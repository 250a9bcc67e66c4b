"""``megatron-spin-serve``: talk to what you trained, with the clients you already use.

    megatron-spin-serve RUN_DIR | CHECKPOINT | MEGATRON_DIR | HF_DIR | packaged:smollm2
        [--host 127.0.0.1] [--port 30000] [--api-key KEY] [--engine auto|embedded|sglang] [--tp-size N]

Resolves the path to an HF directory (a run's newest checkpoint is exported once, see
:mod:`megatron_spin.convert.servable`), starts an engine on it and prints the OpenAI base URL
and the API key, then serves until Ctrl-C or SIGTERM:

* ``embedded`` (the default without a GPU): megatron_spin's CPU engine — SGLang's native routes
  and the OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``;
* ``sglang`` (the default where CUDA and SGLang are present): ``sglang.launch_server`` with the
  flags the rollout fleet uses (unverified on GPU).

Loopback by default.  Every route but ``/health`` needs ``Authorization: Bearer KEY``; without
``--api-key`` a random key is made (and ``MEGATRON_SPIN_ENGINE_API_KEY`` is read if set), and
binding another address without a key is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Optional

from megatron_spin import platform
from megatron_spin.convert.servable import NotServable, resolve_servable
from megatron_spin.rollout.launcher import (API_KEY_ENV, EngineKind, ServerProcess, ServerStartError, bound_socket,
                                            launch_embedded, launch_sglang)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def choose_engine(requested: str) -> EngineKind:
    """``auto``: SGLang where CUDA and SGLang are both present, else the embedded engine."""
    if requested != "auto":
        return EngineKind(requested)
    if platform.current().is_cuda and importlib.util.find_spec("sglang") is not None:
        return EngineKind.SGLANG
    return EngineKind.EMBEDDED


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatron-spin-serve", description=__doc__.split("\n\n")[0],
                                epilog="Example: megatron-spin-serve runs/spin_trainer  (then point an OpenAI client "
                                       "at the printed URL and key)")
    p.add_argument("path", help="a run directory, a run checkpoint, a megatron_spin model, an HF model directory, "
                                "or packaged:smollm2")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=30000, help="port (0: any free one; default 30000, SGLang's)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"the key clients send (default: ${API_KEY_ENV}, else a random one, printed)")
    p.add_argument("--engine", choices=("auto", *EngineKind), default="auto",
                   help="auto: sglang with CUDA and SGLang installed, else the embedded CPU engine")
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: run/step_N or "
                                                             "the directory's name)")
    p.add_argument("--export-dir", default=None, help="where Megatron weights are exported to HF (default: "
                                                      "RUN/exports/step_N, or NAME-hf beside a model)")
    p.add_argument("--threads", type=int, default=0, help="embedded engine: torch CPU threads (0: torch's default)")
    p.add_argument("--tp-size", type=int, default=1, help="sglang: tensor-parallel GPUs per engine")
    p.add_argument("--dtype", default=None, help="embedded: float32 (default) | bfloat16 | float16; "
                                                 "sglang: auto (default) or a dtype")
    p.add_argument("--log", default=None, help="the engine's log file (default: EXPORT_OR_MODEL/serve.log)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"error: --host {args.host} is reachable from other machines: give --api-key (or set "
              f"{API_KEY_ENV}); the weight routes must never be open", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # from here on SIGTERM stops as Ctrl-C does, also mid-start
    started: list[ServerProcess] = []
    try:
        return _serve(args, started)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        return 0
    finally:
        for server in started:
            server.stop()


def _serve(args: argparse.Namespace, started: list[ServerProcess]) -> int:
    try:
        target = resolve_servable(args.path, export_dir=args.export_dir)
    except (NotServable, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api_key = args.api_key or secrets.token_urlsafe(24)
    name = args.served_model_name or target.name
    engine = choose_engine(args.engine)
    log = Path(args.log) if args.log else target.hf_dir.parent / f"serve-{target.hf_dir.name}.log"
    print(f"[serve] starting the {engine} engine on {target.hf_dir} (log: {log}) ...", flush=True)
    try:
        server = _start(engine, target.hf_dir, name, args, api_key, log)
    except OSError as exc:  # the address: taken, or not this machine's
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except ServerStartError as exc:
        print(f"error: the engine did not start: {exc}", file=sys.stderr)
        return 1
    started.append(server)
    print(f"[serve] model:   {name}  (from {target.source})", flush=True)
    print(f"[serve] url:     {server.url}/v1", flush=True)
    print(f"[serve] api key: {api_key}", flush=True)
    print(f"[serve] try:     OPENAI_BASE_URL={server.url}/v1 OPENAI_API_KEY={api_key} python -c \"import openai; "
          f"print(openai.OpenAI().chat.completions.create(model='{name}', messages=[{{'role': 'user', "
          f"'content': 'Hello!'}}]).choices[0].message.content)\"", flush=True)
    print("[serve] serving; Ctrl-C stops", flush=True)
    code = server.proc.wait()
    print(f"error: the engine exited with {code}; end of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
    return 1


def _start(engine: EngineKind, hf_dir: Path, name: str, args: argparse.Namespace, api_key: str,
           log: Path) -> ServerProcess:
    named = ["--served-model-name", name]
    if engine == EngineKind.EMBEDDED:
        return launch_embedded(hf_dir, host=args.host, port=args.port, api_key=api_key, log_path=log,
                               threads=args.threads, dtype=args.dtype or "float32", timeout=600, engine_args=named)
    port = args.port
    if port == 0:  # SGLang binds by number: take a free one (another process could race for it)
        with bound_socket(args.host) as sock:
            port = sock.getsockname()[1]
    return launch_sglang(  # pragma: no cover - GPU tier, unverified
        str(hf_dir), host=args.host, port=port, log_path=log, api_key=api_key, tp_size=args.tp_size,
        dtype=args.dtype or "auto", extra=named)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
