"""The embedded engine inside the trainer rank's process (transport ``shared``): its parameters
are the actor's own tensors, and its HTTP server runs on a thread of that process.

    served = InProcessEngine.start(hf_dir, named, api_key=KEY)   # named: every (HF name, tensor) of the model
    served.url                     # the fleet reaches it like any engine: pause, generate, sessions, versions
    served.engine.share_weights(named, complete=False)   # a push (sync.transports.SharedTransport)
    served.stop()

The HF model is built from ``hf_dir``'s config with parameters on the meta device (nothing read,
nothing allocated; buffers such as RoPE's frequencies are real), then every parameter is bound
to its tensor in ``named``: the converter table's Megatron → HF transforms give *views* of the
actor's parameters for the embeddings, norms, output and down projections and the gate/up halves
of ``linear_fc1``, which become the engine's storage as they are; only tensors a transform had to
build (the split QKV: ~12% of a Llama's weights) are the engine's own copies, refreshed at each
push.  The optimizer updates the actor's parameters in place, so after an update the engine
already serves them; the push re-binds (a no-op where the storage is unchanged), re-copies the
QKV and advances ``weight_version``.

Nothing here knows Megatron: ``named`` is any stream of HF tensors, the ones a stage push sends.
Generation and training take turns (the driver waits for each), so the engine never reads a
parameter while the optimizer writes it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from typing import Iterable, Optional

import torch

from megatron_spin.lifetime import keep_out_of_forks, release_port
from megatron_spin.rollout.embedded.engine import EmbeddedEngine
from megatron_spin.rollout.embedded.group_joins import JoinPolicy
from megatron_spin.rollout.embedded.server import SHUTDOWN_GRACE_S, build_app

log = logging.getLogger("megatron_spin.rollout.in_process")


def empty_hf_model(hf_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    """``hf_dir``'s causal LM on the CPU with unwritten parameters (nothing read; no page of them
    touched, so none resident) and real buffers (RoPE's frequencies).  Tied parameters stay tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    # A meta parameter cannot take a CPU tensor as its data: replace each by a CPU parameter of the
    # same shape, then tie again (the meta model's tied parameters are two objects).
    for module in list(model.modules()):
        for attr, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
    model.tie_weights()
    return model.eval()


@dataclasses.dataclass
class InProcessEngine:
    engine: EmbeddedEngine
    url: str
    _server: object
    _thread: threading.Thread

    @classmethod
    def start(cls, hf_dir: str, named: Iterable[tuple[str, torch.Tensor]], *, api_key: Optional[str],
              weight_version: str = "default", timeout_s: float = 60.0) -> "InProcessEngine":
        """Build the engine on ``named`` (every tensor of the model, or :class:`PayloadError`) and
        serve it on 127.0.0.1 at a free port; returns once the server accepts connections."""
        import uvicorn
        from transformers import AutoTokenizer

        named = list(named)
        dtype = named[0][1].dtype if named else torch.float32
        model = empty_hf_model(hf_dir, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        except (OSError, ValueError):
            tokenizer = None
        engine = EmbeddedEngine(model, tokenizer, model_path=hf_dir, weight_version=weight_version,
                                joins=JoinPolicy.for_host("127.0.0.1"))
        engine.share_weights(named, complete=True)
        # IPPROTO_TCP named: asyncio disables Nagle only on sockets whose proto says TCP (proto 0 would
        # leave it on, and each small reply would wait ~40 ms for the client's delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        config = uvicorn.Config(build_app(engine, api_key), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        server = uvicorn.Server(config)  # off the main thread it installs no signal handlers
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="in-process-engine",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                engine.shutdown()
                raise RuntimeError(f"the in-process engine's server did not start within {timeout_s:g} s")
            time.sleep(0.01)
        port = sock.getsockname()[1]
        # The rank forks helpers (Megatron's checkpoint writer): they must not keep its connections.
        keep_out_of_forks(port)
        url = f"http://127.0.0.1:{port}"
        log.info("in-process engine serving at %s", url)
        return cls(engine, url, server, thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self.engine.shutdown()
        release_port(int(self.url.rsplit(":", 1)[1]))
