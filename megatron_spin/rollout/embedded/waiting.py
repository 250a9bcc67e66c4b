"""Waiting for a generation on the server's event loop while watching the client's connection.

A handler must not hold a thread while the engine works, and must notice a client that hangs
up: its generation is then abandoned (dropped from the queue, or its rows stopped at the next
decode step) so the next request is served at once.  Streaming replies get the same from
Starlette, which cancels the stream when the client disconnects; their generators abandon the
generation in a ``finally``.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.embedded.engine import EmbeddedEngine, PendingGeneration

CLIENT_GONE = 499  # nginx's "client closed request": the status of a reply nobody reads (logged only)


async def wait_or_abandon(engine: EmbeddedEngine, pending: PendingGeneration,
                          receive) -> Optional[list[list[P.Completion]]]:
    """Wait for ``pending`` (no thread held) while watching the connection: if the client hangs
    up first, or this task is cancelled (shutdown), the engine abandons the request and None is
    returned."""
    done = asyncio.wrap_future(pending.future)
    gone = asyncio.ensure_future(client_gone(receive))
    try:
        await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not pending.future.done():
            engine.abandon(pending)
            done.cancel()
    if pending.future.cancelled():
        return None
    return engine.replies(pending)


async def client_gone(receive) -> None:
    """Returns when the server reports the client's disconnect (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass
