"""A rollout engine process owned by a Ray actor, so Ray places it on a node like any worker.

The actor starts the server (the embedded engine, or SGLang on GPUs) on its node, waits until
it is healthy, and reports its URL; the server process dies with the actor (it is started
with a parent-death signal), so tearing the Ray job down leaves no engine behind.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from megatron_spin.config.run import RolloutConfig
from megatron_spin.orchestrate.ray_nodes import node_address
from megatron_spin.rollout.launcher import EngineKind, launch_embedded, launch_sglang


@dataclasses.dataclass(frozen=True)
class EngineLaunch:
    """What an engine is started with beyond the rollout section: facts of this run.

    The actor that hosts an engine unpickles these and the rollout section, so neither module may
    import torch (the run config does not; ``tests/unit/test_import_graph.py`` checks): a host
    stays ~85 MB instead of ~270."""

    model_path: str  # the HF directory the engine loads
    host: str = "127.0.0.1"  # the address the server binds (0.0.0.0 on a multi-node run)
    api_key: Optional[str] = None
    log_dir: str = "."
    threads: int = 0  # embedded engine: torch threads (0: torch's default)


class EngineHost:
    def __init__(self, index: int, rollout: RolloutConfig, launch: EngineLaunch,
                 gpu_ids: Optional[tuple[str, ...]] = None, device_ids: Optional[tuple[str, ...]] = None):
        """``gpu_ids``: a colocated SGLang engine's GPUs, as Ray named them to its feeder ranks (None:
        what Ray gave the actor).
        ``device_ids``: the simulated devices an embedded engine's ranks hold (CPU tensor pushes)."""
        self.index, self.rollout, self.launch = index, rollout, launch
        self.gpu_ids, self.device_ids = gpu_ids, device_ids
        self.server = self._start(port=0 if rollout.engine == EngineKind.EMBEDDED else 30000 + index)

    def _start(self, port: int):
        rollout, launch = self.rollout, self.launch
        log = Path(launch.log_dir) / f"engine-{self.index}.log"
        if rollout.engine == EngineKind.EMBEDDED:
            return launch_embedded(launch.model_path, host=launch.host, port=port, api_key=launch.api_key,
                                   log_path=log, threads=launch.threads, timeout=600, device_ids=self.device_ids)
        return launch_sglang(  # pragma: no cover - GPU tier, unverified
            launch.model_path, host=launch.host, port=port, log_path=log, api_key=launch.api_key,
            tp_size=rollout.tp_size, mem_fraction_static=rollout.mem_fraction_static,
            enable_memory_saver=rollout.colocated, quantization=rollout.quantization,
            deterministic=rollout.deterministic, visible_devices=self.gpu_ids)

    def running(self) -> bool:
        """Whether the server process is alive (not whether it answers: a busy engine is running)."""
        return self.server.proc is not None and self.server.proc.poll() is None

    def restart(self) -> str:
        """Start the engine again, on the same address, so the fleet's client and the push routes
        stay valid; it loads the run's initial weights and serves after the next weight push."""
        port = int(self.server.url.rsplit(":", 1)[1])
        self.server.stop()
        self.server = self._start(port)
        return self.url()

    def url(self) -> str:
        return reachable_url(self.server.url, self.launch.host, node_address())

    def pid(self) -> int:
        return self.server.proc.pid if self.server.proc else -1

    def stop(self) -> Optional[int]:
        return self.server.stop()

    def __del__(self):
        try:
            self.server.stop()
        except Exception:
            pass


def reachable_url(url: str, bound_host: str, node_ip: str) -> str:
    """Where other nodes reach a server: one bound to every interface (multi-node runs bind
    0.0.0.0) is reached at its node's address, never at the wildcard."""
    if bound_host in ("0.0.0.0", "::", "[::]"):
        scheme, rest = url.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://{node_ip}:{port}"
    return url


def engine_log_dir(run_dir: str) -> str:
    path = os.path.join(run_dir, "logs")
    os.makedirs(path, exist_ok=True)
    return path
