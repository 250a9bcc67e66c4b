"""The embedded engine's limits, over real HTTP on 127.0.0.1: what it refuses, and what a client
that gives up, a flood of group joins or SIGTERM do to it.

One engine (a tiny random Llama with a 20,000-token vocabulary, so its embedding holds more
values than ``/get_weights_by_name`` returns at once) serves most tests; the join-timeout and
SIGTERM tests start their own.  Requests a client abandons are made with raw sockets, so the
test controls exactly when the connection closes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.client import EngineError, EngineRequestError
from megatron_spin.rollout.embedded.server import SHUTDOWN_GRACE_S
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.rollout.launcher import launch_embedded
from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams
from megatron_spin.wire.update_group import create_update_group, host_store
from tests.conftest import make_tiny_hf

pytestmark = [pytest.mark.timeout(300)]

KEY = "limits-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 20000
PROMPT = [3, 14, 15, 92, 65]
# About 5-10 s of work here: 1024 greedy samples of 120 tokens (the context is 128).
LONG = {"input_ids": [PROMPT], "sampling_params": {"n": 1024, "max_new_tokens": 120, "temperature": 0,
                                                   "ignore_eos": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("limits") / "hf", "llama", layers=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("limits-log") / "engine.log"
    with launch_embedded(model_dir, api_key=KEY, log_path=log, threads=1) as srv:
        yield srv


def info(server) -> dict:
    return requests.get(server.url + "/get_server_info", headers=AUTH, timeout=10).json()


def post(server, route, body, timeout=10.0, **kwargs) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server.url + route, data=data, timeout=timeout, **kwargs,
                         headers={**AUTH, "Content-Type": "application/json"})


def open_request(server, route: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and leave it waiting for the reply (close it to hang up)."""
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


# --------------------------------------------------------------------------- item 3: bad requests
BAD_GENERATE = [
    ({"input_ids": [[1, 2, VOCAB]], "sampling_params": {"max_new_tokens": 1}},
     f"input_ids[0][2] = {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    ({"input_ids": [1, 2, 10**20], "sampling_params": {"max_new_tokens": 1}}, "outside the vocabulary"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be >= 0"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**30}}, "exceed the model's context"),
    ({"input_ids": [1, 2], "sampling_params": {"n": 0}}, "n must be >= 1"),
    ({"input_ids": [1, 2], "sampling_params": {"n": 10**9}}, "this engine takes at most 1024"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "'temperature' must be float"),
    ('{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "temperature must be finite"),
    ('{"input_ids": [1, 2], "sampling_params": {"top_p": Infinity}}', "top_p must be in (0, 1]"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k must be -1 (off) or >= 1"),
    ({"input_ids": [1, 2], "sampling_params": {"sampling_seed": 2**64}}, "sampling_seed must be in"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": "x"}}, "stop_token_ids must be a list"),
    ({"input_ids": "abc"}, "'input_ids' must be a non-empty list"),
    ({"input_ids": [1.5, 2]}, "non-negative token ids"),
    ({"input_ids": [1, 2], "return_logprob": "yes"}, "'return_logprob' must be bool"),
    ("{not json", "body is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "body is not JSON (RecursionError"),  # deeper than the parser goes
    (b"\xff\xfe{", "body is not JSON"),
    ([1, 2], "must be a JSON object"),
]


def test_bad_requests_are_400_with_a_message_and_the_engine_keeps_serving(server):
    for body, expect in BAD_GENERATE:
        reply = post(server, P.GENERATE, body)
        assert reply.status_code == 400, (body if len(str(body)) < 200 else str(body)[:50], reply.text[:300])
        assert expect in reply.json()["error"]["message"], (expect, reply.text[:300])
    assert requests.get(server.url + P.HEALTH, timeout=10).status_code == 200
    good = post(server, P.GENERATE, {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert good.status_code == 200 and len(good.json()["output_ids"]) == 2


def test_a_refused_request_is_the_callers_error_and_the_engine_stays_in_the_fleet(server):
    client = server.client(retries=2, backoff=0.05)
    with pytest.raises(EngineRequestError, match="HTTP 400: input_ids") as info_:
        client.generate(GenerateRequest(((1, 2, VOCAB + 5),), SamplingParams(max_new_tokens=1)))
    assert info_.value.status == 400 and not info_.value.engine_failed
    fleet = RolloutFleet([server.client(retries=0)])
    try:
        with pytest.raises(EngineRequestError, match="outside the vocabulary"):
            fleet.generate([[1, 2], [1, VOCAB]], SamplingParams(max_new_tokens=1))
        assert fleet.slots[0].healthy and fleet.slots[0].failures == 0
        assert len(fleet.generate([[1, 2]], SamplingParams(max_new_tokens=1))) == 1  # and it still serves
    finally:
        fleet.close()
        client.close()


def test_generation_a_client_abandoned_stops_and_the_next_request_is_served_at_once(server):
    before = info(server)["abandoned_requests"]
    running = open_request(server, P.GENERATE, LONG)
    time.sleep(1.0)  # the batch is running
    queued = open_request(server, P.GENERATE, LONG)  # waits behind it
    time.sleep(0.3)
    running.close()  # both clients give up
    queued.close()
    started = time.monotonic()
    reply = post(server, P.GENERATE, {"input_ids": [PROMPT], "sampling_params": {"max_new_tokens": 2}}, timeout=60)
    took = time.monotonic() - started
    assert reply.status_code == 200
    # Without abandonment it would wait for ~2 x 1024 x 120 tokens (several seconds each).
    assert took < 2.5, f"the next request waited {took:.1f} s behind abandoned work"
    assert info(server)["abandoned_requests"] - before == 2


# --------------------------------------------------------------------------- item 5: limits
def test_a_chunked_body_is_capped_while_it_arrives(server):
    """No Content-Length: the 64 MiB cap is enforced on the bytes read, and the rest is never read."""
    url = urlsplit(server.url)
    head = (f"POST {P.GENERATE} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    # Under the cap a chunked body is served as any other.
    small = json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, small[:5], len(small) - 5, small[5:]))
        reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    # Over it: one thread streams 1 MiB chunks (up to 96 MiB) while this one waits for the answer.
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)

        def flood():
            nonlocal sent
            chunk = b"x" * (1 << 20)
            try:
                while sent < 96 * (1 << 20):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                sock.sendall(b"0\r\n\r\n")  # the end of the body: an engine without the cap answers now
            except OSError:
                pass  # the engine closed the connection: what it should do

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        reply = read_reply(sock)
        sender.join(30)
    assert reply.startswith(b"HTTP/1.1 413"), (sent, reply[:300])
    assert b"request body over 67108864 bytes" in reply
    assert sent < 80 * (1 << 20)  # refused once past the cap, not after the whole body
    assert requests.get(server.url + P.HEALTH, timeout=10).status_code == 200


def read_reply(sock: socket.socket) -> bytes:
    """One reply (head and a Content-Length body) as it arrives, or what came before the connection ended."""
    reply = b""
    try:
        while True:
            head, sep, body = reply.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if sep and len(body) >= length:
                return reply
            data = sock.recv(65536)
            if not data:
                return reply
            reply += data
    except ConnectionResetError:
        return reply


def test_get_weights_by_name_returns_a_bounded_number_of_values(server):
    c = server.client(retries=0)
    assert len(c.get_weights_by_name("model.embed_tokens.weight", truncate_size=3)) == 3  # three rows
    with pytest.raises(EngineRequestError, match=r"at most 1048576 per call \(truncate_size <= 16384\)"):
        c.get_weights_by_name("model.embed_tokens.weight", truncate_size=10**12)  # 20000 x 64 values
    with pytest.raises(EngineRequestError, match="truncate_size must be >= 0"):
        c.get_weights_by_name("model.embed_tokens.weight", truncate_size=-1)  # all rows but the last
    with pytest.raises(EngineRequestError, match="'truncate_size' must be an integer"):
        c.get_weights_by_name("model.norm.weight", truncate_size="7")
    c.close()


def test_weight_versions_are_short_printable_labels(server):
    c = server.client(retries=0)
    version = c.weight_version()
    for bad in ("v" * 257, "a\nb", "", "\x00"):
        reply = post(server, P.UPDATE_WEIGHT_VERSION, {"new_version": bad})
        assert reply.status_code == 400 and "1 to 256 printable characters" in reply.json()["message"], reply.text
        reply = post(server, P.UPDATE_FROM_DISK, {"model_path": "/nonexistent", "weight_version": bad})
        assert reply.status_code == 400 and "1 to 256 printable characters" in reply.json()["message"], reply.text
    assert c.weight_version() == version
    c.update_weight_version("step-7 " + "v" * 249)  # 256 characters are fine
    assert c.weight_version() == "step-7 " + "v" * 249
    c.update_weight_version(version)
    c.close()


def join(server, timeout=10.0, **fields) -> requests.Response:
    body = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 3,
            "group_name": f"g{time.monotonic_ns()}", "backend": "gloo", **fields}
    return post(server, P.INIT_UPDATE_GROUP, body, timeout=timeout)


def test_update_groups_are_joined_as_a_member_at_an_address_of_this_machine(server):
    """Rank 0 would make the engine host the group's store, listening on every interface."""
    ports = listening_ports(server.proc.pid)
    cases = [
        ({"rank_offset": 0, "world_size": 2}, "rank_offset must be in [1, world_size)"),
        ({"rank_offset": 3}, "rank_offset must be in [1, world_size)"),
        ({"world_size": 1, "rank_offset": 0}, "world_size must be >= 2"),
        ({"master_address": "0.0.0.0"}, "is unspecified"),
        ({"master_address": "::"}, "is unspecified"),
        ({"master_address": "198.51.100.7"}, "is not an address of this machine"),  # TEST-NET-2
        ({"master_address": "no-such-host.invalid"}, "does not resolve"),
        ({"master_port": 0}, "master_port must be in [1, 65535]"),
        ({"master_port": "29500"}, "'master_port' must be an integer"),
        ({"group_name": "x" * 300}, "group_name must be 1 to 256 printable characters"),
    ]
    for fields, expect in cases:
        started = time.monotonic()
        reply = join(server, **fields)
        assert reply.status_code == 400 and expect in reply.json()["message"], (fields, reply.text)
        assert time.monotonic() - started < 5, fields
    assert listening_ports(server.proc.pid) == ports  # no store was opened


def test_a_member_joins_and_impossible_announcements_are_refused(server):
    """The trainer's way (rank >= 1, the pusher's store on 127.0.0.1) joins; an announced shape
    that no tensor can have is a 400, before the engine takes part in any broadcast."""
    name = f"member-{time.monotonic_ns()}"
    store = host_store("127.0.0.1", 2, 30.0)
    with cf.ThreadPoolExecutor(1) as pool:
        joined = pool.submit(join, server, 30.0, master_port=store.port, world_size=2, group_name=name)
        group = create_update_group("127.0.0.1", store.port, 0, 2, name, "gloo", timeout_s=30.0, store=store)
        assert joined.result().status_code == 200, joined.result().text
    c = server.client(retries=0)
    c.begin_weight_update()
    try:
        for shape, expect in (([2**62, 2**62], "is impossible"), ([10**30], "is impossible"),
                              ([-1], "non-negative integers"), (["a"], "non-negative integers")):
            reply = post(server, P.UPDATE_FROM_DISTRIBUTED, {"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                             "shapes": [shape], "group_name": name})
            assert reply.status_code == 400 and expect in reply.json()["message"], (shape, reply.text)
    finally:
        c.end_weight_update()
        c.destroy_weights_update_group(name)
        group.destroy()
        c.close()


def test_pending_group_joins_are_bounded_and_generation_goes_on(server):
    """45 joins whose group never completes: 8 wait, the rest are refused at once (429), and
    /generate answers meanwhile; when the trainer's store goes away the waiting ones fail (400)."""
    store = host_store("127.0.0.1", 3, 60.0)  # rank 2 never comes
    with cf.ThreadPoolExecutor(45) as pool:
        joins = [pool.submit(join, server, 60.0, master_port=store.port) for _ in range(45)]
        deadline = time.monotonic() + 20
        while sum(f.done() for f in joins) < 37 and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = [f.result() for f in joins if f.done()]
        assert len(refused) == 37 and all(r.status_code == 429 for r in refused), [r.text for r in refused][:3]
        assert "8 weight-update group joins are already waiting" in refused[0].json()["message"]
        started = time.monotonic()
        reply = post(server, P.GENERATE, {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        assert reply.status_code == 200 and time.monotonic() - started < 5
        del store  # the trainer gives up: its store closes
        waited = [f.result(timeout=30) for f in joins]
    failed = [r for r in waited if r.status_code != 429]
    assert len(failed) == 8 and all(r.status_code == 400 and "could not join" in r.json()["message"]
                                    for r in failed), [r.text for r in failed][:3]
    assert requests.get(server.url + P.HEALTH, timeout=10).status_code == 200


def test_a_group_join_gives_up_after_its_timeout(model_dir, tmp_path):
    with launch_embedded(model_dir, api_key=KEY, log_path=tmp_path / "e.log", threads=1,
                         engine_args=["--join-timeout-s", "2", "--max-pending-joins", "1"]) as srv:
        store = host_store("127.0.0.1", 3, 60.0)  # rank 2 never comes
        with cf.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            waiting = pool.submit(join, srv, 30.0, master_port=store.port)
            time.sleep(0.5)
            assert join(srv, master_port=store.port).status_code == 429  # the one slot is taken
            reply = waiting.result(timeout=30)
        took = time.monotonic() - started
        assert reply.status_code == 400 and "could not join" in reply.json()["message"], reply.text
        assert "join timeout 2 s" in reply.json()["message"]
        assert 1.5 < took < 10
        del store


def test_sigterm_stops_the_engine_within_seconds_even_while_it_works(model_dir, tmp_path):
    srv = launch_embedded(model_dir, api_key=KEY, log_path=tmp_path / "e.log", threads=1)
    store = host_store("127.0.0.1", 3, 60.0)
    try:
        busy = open_request(srv, P.GENERATE, LONG)  # a long generation in flight...
        port = store.port
        pending = threading.Thread(target=lambda: _ignore(join, srv, 30.0, master_port=port), daemon=True)
        pending.start()  # ...and a join waiting for peers that never come
        time.sleep(1.0)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=SHUTDOWN_GRACE_S + 5)
        except Exception:
            pytest.fail(f"the engine was still running {SHUTDOWN_GRACE_S + 5} s after SIGTERM")
        assert time.monotonic() - started < SHUTDOWN_GRACE_S + 5
        with pytest.raises(EngineError):  # it no longer serves
            srv.client(retries=0).model_info(timeout=2)
        busy.close()
    finally:
        srv.stop()
        del store


def _ignore(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except requests.RequestException:
        pass
