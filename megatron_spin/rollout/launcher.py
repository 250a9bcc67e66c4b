"""Start, wait for and stop engine server processes: the embedded engine and SGLang.

    with launch_embedded(model_dir, api_key=KEY) as server:
        client = server.client()
        ...

The launcher binds the listening socket itself and hands it to the server process, so the
port is known before the server starts and no other process can take it in between.  The
server runs in its own session (so ``stop`` reaches its children), logs to a file, and dies
with the launcher.  ``wait_healthy`` polls ``/health``; if the process exits first the error
quotes the end of its log.

SGLang (GPU tier; unverified here): ``python -m sglang.launch_server`` with the model path,
TP size, port, static memory fraction, and the API key, with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` so that its log-probs are of the raw (temperature 1)
distribution, as the trainer's are.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_spin.lifetime import die_with_parent
from megatron_spin.rollout.client import EngineClient

API_KEY_ENV = "MEGATRON_SPIN_ENGINE_API_KEY"


class EngineKind(enum.StrEnum):
    EMBEDDED = "embedded"  # megatron_spin's own engine: HF transformers behind SGLang's API (CPU)
    SGLANG = "sglang"  # SGLang servers (GPU)


class Colocation(enum.StrEnum):
    COLOCATED = "colocated"  # engines share the trainer's devices and sleep while the actor trains
    DISAGGREGATED = "disaggregated"  # engines have devices of their own


class Quantization(enum.StrEnum):
    FP8 = "fp8"  # SGLang serves FP8 weights it quantises from the bf16 pushes (experimental)


class ServerStartError(RuntimeError):
    pass


@dataclasses.dataclass
class ServerProcess:
    cmd: list[str]
    url: str
    log_path: Path
    api_key: Optional[str] = None
    env: Optional[dict] = None
    pass_fds: tuple[int, ...] = ()
    proc: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})}, pass_fds=self.pass_fds,
                start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # in the child, before exec
            )
        return self

    def client(self, **kwargs) -> EngineClient:
        return EngineClient(self.url, api_key=self.api_key, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        client = self.client(retries=0, connect_timeout=2.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise ServerStartError(f"{self.cmd[:4]} exited with {self.proc.returncode} before it was "
                                           f"healthy; end of {self.log_path}:\n{self.log_tail()}")
                if client.healthy(timeout=interval * 8):
                    return
                time.sleep(interval)
        finally:
            client.close()
        self.stop()
        raise ServerStartError(f"{self.url} not healthy after {timeout:.0f} s; end of {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready socket on ``host:port`` (0: any free port) to hand to a server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


AUTO_KEY = "auto"


def launch_embedded(
    model_path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0, api_key: Optional[str] = AUTO_KEY,
    log_path: Optional[str | os.PathLike] = None, threads: int = 0, weight_version: str = "default",
    max_batch_tokens: int = 16384, timeout: float = 300.0, wait: bool = True,
    device_ids: Optional[Sequence[str]] = None, device: str = "cpu", dtype: str = "float32",
    engine_args: Sequence[str] = (),
) -> ServerProcess:
    """Start the embedded engine on ``model_path`` and (by default) wait until it is healthy.

    ``api_key="auto"`` (the default) makes a random key, known to ``server.client()``: even on
    loopback, other local users must not be able to push weights.  ``None`` runs without one.
    ``device_ids``: the engine simulates one TP rank per id, holding that device (CPU tests of
    device locality).  ``device``/``dtype``: where and in what the model runs (cuda: the GPU check).
    ``engine_args``: more of the engine's flags (its limits: ``python -m megatron_spin.rollout.embedded -h``).
    """
    if api_key == AUTO_KEY:
        api_key = secrets.token_urlsafe(24)
    sock = bound_socket(host, port)
    port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "megatron_spin.rollout.embedded", "--model-path", str(model_path),
           "--host", host, "--port", str(port), "--fd", str(sock.fileno()),
           "--weight-version", weight_version, "--max-batch-tokens", str(max_batch_tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    if device_ids:
        cmd += ["--device-ids", ",".join(device_ids)]
    if device != "cpu" or dtype != "float32":
        cmd += ["--device", device, "--dtype", dtype]
    cmd += list(engine_args)
    log = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"megatron_spin-engine-{port}.log"
    env = {API_KEY_ENV: api_key} if api_key else {}
    if device == "cpu":
        from megatron_spin.platform import cpu_worker_env

        env.update(cpu_worker_env(os.environ))  # it allocates as the trainer ranks do
    server = ServerProcess(cmd, f"http://{host}:{port}", log, api_key, env, pass_fds=(sock.fileno(),))
    try:
        server.start()
    finally:
        sock.close()  # the child holds its own copy
    if wait:
        server.wait_healthy(timeout)
    return server


def sglang_command(model_path: str, *, tp_size: int = 1, host: str = "127.0.0.1", port: int = 30000,
                   mem_fraction_static: Optional[float] = None, api_key: Optional[str] = None,
                   dtype: str = "auto", weight_version: str = "default", enable_memory_saver: bool = False,
                   quantization: Optional[str] = None, deterministic: bool = False,
                   extra: Sequence[str] = ()) -> list[str]:
    """The ``sglang.launch_server`` command line for one engine.

    ``quantization="fp8"``: the engine serves FP8 weights it quantises itself from the bf16
    checkpoint (SGLang's online FP8), so the trainer sends bf16 and the one converter table stays
    dtype-agnostic.  Experimental and unverified on GPU: online quantisation happens at load, and
    whether a later bf16 weight update is re-quantised depends on the SGLang version (the same
    path has been broken in vLLM); check the log-prob probe (``sync.verify_every``) before use.
    """
    if tp_size < 1:
        raise ValueError(f"rollout tp_size must be >= 1, got {tp_size}")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--tp-size", str(tp_size), "--host", host, "--port", str(port), "--dtype", dtype,
           "--weight-version", weight_version, "--skip-server-warmup"]
    if mem_fraction_static is not None:
        if not 0 < mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if api_key:
        cmd += ["--api-key", api_key]
    if quantization:
        cmd += ["--quantization", quantization]
    if enable_memory_saver:
        cmd += ["--enable-memory-saver"]  # needed for release/resume_memory_occupation (colocated mode)
    if deterministic:
        cmd += ["--enable-deterministic-inference"]  # sampling_seed applies only then (slower kernels)
    return cmd + list(extra)


SGLANG_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RETURN_ORIGINAL_LOGPROB": "1"}  # 0.5.10+ / older name


def launch_sglang(model_path: str, *, port: int, log_path: str | os.PathLike, host: str = "127.0.0.1",
                  timeout: float = 1200.0, visible_devices: Optional[Sequence[str]] = None,
                  **kwargs) -> ServerProcess:
    """Start one SGLang server (GPU tier; unverified on GPU) and wait until it is healthy.

    ``visible_devices``: the server's ``CUDA_VISIBLE_DEVICES`` (a colocated engine: the GPU ids
    Ray gave the trainer ranks that feed it); None: what this process sees."""
    cmd = sglang_command(model_path, host=host, port=port, **kwargs)
    env = dict(SGLANG_ENV)
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_devices)
    server = ServerProcess(cmd, f"http://{host}:{port}", Path(log_path), kwargs.get("api_key"), env).start()
    server.wait_healthy(timeout)
    return server
