"""The embedded engine inside the trainer rank's process (transport ``shared``): its parameters
are the actor's own tensors, and its HTTP server runs on a thread of that process.

    served = InProcessEngine.start(hf_dir, named, api_key=KEY)   # named: every (HF name, tensor) of the model
    served.url                     # the fleet reaches it like any engine: pause, generate, sessions, versions
    served.engine.share_weights(named)   # a push, inside a weight-update session (sync.transports.SharedTransport)
    served.stop()

The HF model is built from ``hf_dir``'s config (and its generation config: the end-of-sequence
ids) with unwritten parameters (virtual memory, nothing read or made resident; buffers such as
RoPE's frequencies are computed), then every parameter is bound to its tensor in ``named``: the
converter table's Megatron → HF transforms give *views* of the actor's parameters for the
embeddings, norms, output and down projections and the gate/up halves of ``linear_fc1``, which
become the engine's storage as they are.  What a transform had to build is the engine's own copy,
refreshed at each push: the split QKV (~12 % of a dense Llama's weights), and every expert of a
MoE model (transformers fuses a layer's experts into one tensor, which cannot be a view of
Megatron's per-expert weights).  The optimizer updates the actor's parameters in place, so after
an update the engine already reads them; the push re-binds (a no-op where the storage is
unchanged), re-copies the rest, checks that every value is finite and advances
``weight_version``.  The engine serves the actor's dtype.

The engine refuses every other way of loading weights (disk, tensor payloads, broadcasts): a
copy into a shared parameter would rewrite the actor's weights behind its optimizer.

Nothing here knows Megatron: ``named`` is any stream of HF tensors, the ones a stage push sends.
Generation and training must take turns — the driver's loop never samples between an update and
its push —, so the engine never reads a parameter while the optimizer writes it, nor serves new
views beside a stale QKV.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Iterable, Optional

import torch

from megatron_spin.lifetime import keep_out_of_forks, release_port
from megatron_spin.rollout.embedded.engine import EmbeddedEngine, load_tokenizer
from megatron_spin.rollout.embedded.group_joins import JoinPolicy
from megatron_spin.rollout.embedded.server import SHUTDOWN_GRACE_S, build_app

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("megatron_spin.rollout.in_process")


def empty_hf_model(hf_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    """``hf_dir``'s causal LM on the CPU with unwritten parameters (``torch.empty``: virtual memory,
    nothing read, no page touched) and real buffers (RoPE's frequencies); tied parameters stay
    tied; the generation config (end-of-sequence ids) read as ``from_pretrained`` reads it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

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
    try:  # from_config reads config.json only; generation_config.json may name more end-of-turn ids
        model.generation_config = GenerationConfig.from_pretrained(hf_dir)
    except OSError:
        pass
    return model.eval()


@dataclasses.dataclass
class InProcessEngine:
    engine: EmbeddedEngine
    url: str
    port: int
    _server: "uvicorn.Server"
    _thread: threading.Thread

    @classmethod
    def start(cls, hf_dir: str, named: Iterable[tuple[str, torch.Tensor]], *, api_key: Optional[str],
              weight_version: str = "default", timeout_s: float = 60.0) -> "InProcessEngine":
        """Build the engine on ``named`` (every tensor of the model, or :class:`PayloadError`) and
        serve it on 127.0.0.1 at a free port; returns once the server accepts connections."""
        import uvicorn

        named = list(named)
        dtype = named[0][1].dtype if named else torch.float32  # the actor's: the engine serves its weights
        model = empty_hf_model(hf_dir, dtype)
        engine = EmbeddedEngine(model, load_tokenizer(hf_dir), model_path=hf_dir, weight_version=weight_version,
                                joins=JoinPolicy.for_host("127.0.0.1"), shares_weights=True)
        sock = None
        try:
            engine.share_weights(named, complete=True)
            # IPPROTO_TCP named: asyncio disables Nagle only on sockets whose proto says TCP (proto 0
            # would leave it on, and each small reply would wait ~40 ms for the client's delayed ACK).
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            # The rank forks helpers (Megatron's checkpoint writer): they must not keep its connections.
            keep_out_of_forks(port)
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
                    server.should_exit = True  # a slow start must not come up later
                    raise RuntimeError(f"the in-process engine's server did not start within {timeout_s:g} s")
                time.sleep(0.01)
        except BaseException:
            engine.shutdown()
            if sock is not None:
                release_port(sock.getsockname()[1])
                sock.close()
            raise
        url = f"http://127.0.0.1:{port}"
        log.info("in-process engine serving at %s", url)
        return cls(engine, url, port, server, thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the in-process engine's server did not stop within %g s", timeout_s)
        self.engine.shutdown()
        release_port(self.port)
