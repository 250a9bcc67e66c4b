"""Which weight-update groups the embedded engine joins, how many at once, and for how long.

``/init_weights_update_group`` makes the engine a *member* of a process group that the trainer's
pusher hosts: rank 0 is the pusher, which runs the group's TCP store at
``master_address:master_port``; engine ranks are ``rank_offset + tp_rank >= 1``.  The rules:

* **Rank 0 is refused.**  The engine would host the store itself, and torch's store server
  listens on every interface whatever address it is given: one request would open a port on
  all of the machine's networks.
* **The master address must name a host**: the unspecified ``0.0.0.0`` / ``::`` is refused.
  An engine whose HTTP server listens on loopback only can be reached only by processes on its
  own machine, so its trainer is local too: it joins only groups hosted at an address of this
  machine (one it can bind), and is never made to connect elsewhere.
* **Joins are bounded**: a join waits for every member of the group (up to ``timeout_s``) and
  holds a server thread while it waits.  At most ``max_pending`` joins wait at once; one more is
  refused at once (:class:`JoinsBusy`, HTTP 429) instead of queueing for a thread, so pending
  joins can never starve generation.  A join whose peers do not come in time fails with
  :class:`JoinFailed`.

Not bounded here: the gloo transport's own listening socket binds the address this machine's
host name resolves to (torch offers no per-group choice); NCCL's follows ``NCCL_SOCKET_IFNAME``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import threading

from megatron_spin.rollout.protocol import ProtocolError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_GROUP_NAME_CHARS = 256


class JoinsBusy(RuntimeError):
    """As many joins as the engine allows are already waiting for their peers (HTTP 429)."""


class JoinFailed(RuntimeError):
    """The group's store could not be reached, or its other members did not come in time (HTTP
    400, as SGLang answers a failed join): the engine itself is fine."""


@dataclasses.dataclass(frozen=True)
class JoinPolicy:
    local_only: bool = True  # the engine serves loopback only: groups must be hosted on this machine
    max_pending: int = 8
    timeout_s: float = 120.0  # how long a join waits for the other members

    def __post_init__(self):
        if self.max_pending < 1 or not self.timeout_s > 0:
            raise ValueError(f"a join policy needs max_pending >= 1 and timeout_s > 0, got {self}")

    @classmethod
    def for_host(cls, bind_host: str, **kwargs) -> "JoinPolicy":
        """The policy of an engine whose HTTP server binds ``bind_host``."""
        return cls(local_only=_is_loopback(bind_host), **kwargs)

    def check(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
              group_name: str) -> None:
        """Raise :class:`ProtocolError` (HTTP 400) naming what this engine will not join."""
        where = "/init_weights_update_group"
        if not 0 < len(group_name) <= MAX_GROUP_NAME_CHARS or not group_name.isprintable():
            raise ProtocolError(f"{where}: group_name must be 1 to {MAX_GROUP_NAME_CHARS} printable characters")
        if not 1 <= master_port <= 65535:
            raise ProtocolError(f"{where}: master_port must be in [1, 65535], got {master_port}")
        if world_size < 2:
            raise ProtocolError(f"{where}: world_size must be >= 2 (the pusher and an engine), got {world_size}")
        if not 1 <= rank_offset < world_size:
            raise ProtocolError(f"{where}: rank_offset must be in [1, world_size) = [1, {world_size}), got "
                                f"{rank_offset}: rank 0 is the trainer's pusher, which hosts the group's store")
        for address in _resolve(master_address, where):
            if address.is_unspecified:
                raise ProtocolError(f"{where}: master_address {master_address!r} is unspecified; send the "
                                    "address where the pusher hosts the group")
            if self.local_only and not _is_local(address):
                raise ProtocolError(f"{where}: master_address {master_address!r} ({address}) is not an address "
                                    "of this machine; an engine serving loopback only joins groups hosted here")


class JoinSlots:
    """At most ``limit`` joins at once; one more raises :class:`JoinsBusy` instead of waiting."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def __enter__(self) -> "JoinSlots":
        if not self._free.acquire(blocking=False):
            raise JoinsBusy(f"{self.limit} weight-update group joins are already waiting for their peers; "
                            "try again when one has finished")
        return self

    def __exit__(self, *exc) -> None:
        self._free.release()


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _resolve(host: str, where: str) -> list:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ProtocolError(f"{where}: master_address {host!r} does not resolve ({exc})") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_local(address) -> bool:
    """An address of this machine: loopback, or one a socket can bind here."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True
