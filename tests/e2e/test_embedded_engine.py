"""The embedded engine as a real server on 127.0.0.1: protocol, API key, bad updates, control routes.

One engine process (a tiny random Llama, API key set) serves the module.  Tests that change
weights put them back, so the order does not matter.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import pickle
import threading
import time

import pytest
import requests
import torch
from safetensors.torch import save_file

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.rollout.launcher import launch_embedded
from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams
from megatron_spin.wire.tensor_payload import encode_named_tensors
from megatron_spin.wire.bucket import flatten
from tests.conftest import make_tiny_hf

pytestmark = [pytest.mark.timeout(300)]

KEY = "embedded-test-key"
PROMPTS = ((3, 14, 15, 92, 65), (35, 89, 79))
CONTROL_ROUTES = [
    ("POST", P.GENERATE), ("POST", P.FLUSH_CACHE), ("POST", P.UPDATE_FROM_TENSOR), ("POST", P.UPDATE_FROM_DISK),
    ("POST", P.INIT_UPDATE_GROUP), ("POST", P.UPDATE_FROM_DISTRIBUTED), ("POST", P.DESTROY_UPDATE_GROUP),
    ("POST", P.GET_WEIGHTS_BY_NAME), ("POST", P.PAUSE), ("POST", P.CONTINUE), ("POST", P.RELEASE_MEMORY),
    ("POST", P.RESUME_MEMORY), ("POST", P.UPDATE_WEIGHT_VERSION), ("POST", P.COMPLETIONS),
    ("POST", P.CHAT_COMPLETIONS), ("GET", P.MODELS), ("GET", P.MODEL_INFO), ("GET", P.WEIGHT_VERSION),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("engine") / "hf", "llama", layers=2)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("engine-log") / "engine.log"
    with launch_embedded(model_dir, api_key=KEY, log_path=log, threads=1) as srv:
        yield srv


@pytest.fixture
def client(server):
    """A client inside a weight-update session (tensor and distributed updates need one, as on SGLang)."""
    c = server.client(retries=0)
    c.begin_weight_update()
    yield c
    c.end_weight_update()
    c.close()


def hf_state(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def scored(client) -> list[torch.Tensor]:
    """The engine's log-probs of the fixed prompts: a fingerprint of all its weights."""
    req = GenerateRequest(PROMPTS, SamplingParams(max_new_tokens=0), return_logprob=True, logprob_start_len=0)
    return [torch.tensor(r[0].input_logprobs[1:]) for r in client.generate(req)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_engine_binds_loopback_only(server):
    assert server.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("method,route", CONTROL_ROUTES)
def test_routes_need_the_api_key(server, method, route):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = requests.request(method, server.url + route, json={}, headers=headers, timeout=10)
        assert reply.status_code == 401, (route, headers, reply.text)
        assert reply.json() == {"error": "Unauthorized"}


def test_health_needs_no_key_and_client_sends_it(server, client):
    assert requests.get(server.url + P.HEALTH, timeout=10).status_code == 200
    assert client.weight_version()  # authenticated call through the client
    with pytest.raises(EngineError, match="401"):
        EngineClient(server.url, api_key="wrong", retries=0).weight_version()


def test_generate_n_samples_logprobs_and_versions(client, model_dir):
    from transformers import AutoModelForCausalLM

    req = GenerateRequest(PROMPTS, SamplingParams(max_new_tokens=6, n=3, temperature=1.0, seed=7), return_logprob=True)
    replies = client.generate(req)
    assert [len(r) for r in replies] == [3, 3]
    version = client.weight_version()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, per_prompt in enumerate(replies):
        for j, c in enumerate(per_prompt):
            assert (c.prompt_index, c.sample_index, c.weight_version) == (i, j, version)
            assert len(c.output_ids) == 6 and c.finish_reason == "length"
            ids = torch.tensor([list(PROMPTS[i]) + list(c.output_ids)])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            ref = logp[len(PROMPTS[i]) - 1:].gather(-1, ids[0, len(PROMPTS[i]):, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(c.output_logprobs, dtype=torch.double), ref, atol=1e-4)
    again = client.generate(req)  # a seed reproduces; different samples of one prompt differ
    assert [[c.output_ids for c in r] for r in again] == [[c.output_ids for c in r] for r in replies]
    assert len({c.output_ids for c in replies[0]}) > 1


def test_concurrent_requests_share_batches(server, client):
    before = requests.get(server.url + "/get_server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    req = GenerateRequest((PROMPTS[0],), SamplingParams(max_new_tokens=8, temperature=0))
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: client.generate(req)[0][0].output_ids, range(16)))
    after = requests.get(server.url + "/get_server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert len(set(outs)) == 1  # greedy: identical whatever the batch
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16  # requests were merged into shared batches


def _evil_payload(marker: str) -> str:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return base64.b64encode(pickle.dumps([("model.norm.weight", Evil())])).decode()


def test_malformed_updates_are_rejected_and_change_nothing(server, client, model_dir, tmp_path):
    state = hf_state(model_dir)
    version = client.weight_version()
    fingerprint = scored(client)
    marker = tmp_path / "pwned"
    norm = state["model.norm.weight"]
    bad_payloads = {
        "forbidden global": ([_evil_payload(str(marker))], None, "refusing to load"),
        "not base64": (["!!not base64!!"], None, "cannot decode"),
        "wrong shape": ([encode_named_tensors([("model.norm.weight", torch.ones(3))])], None, "shape"),
        "unknown name": ([encode_named_tensors([("model.nope.weight", norm.clone())])], None, "unknown tensor"),
        "NaN": ([encode_named_tensors([("model.norm.weight", torch.full_like(norm, float("nan")))])], None, "NaN"),
        "int dtype": ([encode_named_tensors([("model.norm.weight", torch.ones_like(norm, dtype=torch.long))])], None,
                      "floating"),
        # One good tensor with one bad one: the good one must not be applied either.
        "half good": ([encode_named_tensors([("model.norm.weight", norm * 2),
                                             ("model.embed_tokens.weight", torch.ones(2, 2))])], None, "shape"),
        "bad format": ([encode_named_tensors([("model.norm.weight", norm * 2)])], "weird", "load_format"),
        "flat metadata": ([encode_named_tensors([], "flattened_bucket",
                                                (torch.zeros(4, dtype=torch.uint8), flatten([("x", norm)])[1]))],
                          "flattened_bucket", "does not fit"),
        "empty list": ([], None, "one entry per engine TP rank"),
    }
    for what, (serialized, load_format, expect) in bad_payloads.items():
        reply = requests.post(server.url + P.UPDATE_FROM_TENSOR, headers={"Authorization": f"Bearer {KEY}"},
                              json={"serialized_named_tensors": serialized, "load_format": load_format,
                                    "weight_version": "evil"}, timeout=30)
        assert reply.status_code == 400, (what, reply.text)
        body = reply.json()
        assert body["success"] is False and expect in body["message"], (what, body)
    assert not marker.exists()  # the forbidden callable never ran
    for body in ("{not json", '{"names": ["a"]}'):
        reply = requests.post(server.url + P.UPDATE_FROM_DISTRIBUTED, data=body, timeout=10,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert reply.status_code == 400 and reply.json()["success"] is False
    # A disk update from a directory missing a tensor, or with a wrong shape, is refused whole.
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({k: v * 3 for k, v in state.items() if k != "model.norm.weight"}, str(partial / "model.safetensors"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({**{k: v * 3 for k, v in state.items()}, "model.norm.weight": torch.ones(5)},
              str(wrong / "model.safetensors"))
    for path, expect in ((partial, "missing"), (wrong, "shape"), (tmp_path / "absent", "not a directory")):
        with pytest.raises(EngineError, match=expect):
            client.update_weights_from_disk(str(path), weight_version="evil")
    assert client.weight_version() == version
    assert same(scored(client), fingerprint)


def test_valid_updates_apply_and_version_follows(client, model_dir, tmp_path):
    state = hf_state(model_dir)
    version = client.weight_version()
    fingerprint = scored(client)
    changed = {"model.norm.weight": state["model.norm.weight"] * 1.5}
    client.update_weights_from_tensor([encode_named_tensors(list(changed.items()))], weight_version="t1")
    assert client.weight_version() == "t1"
    assert not same(scored(client), fingerprint)
    got = client.get_weights_by_name("model.norm.weight", truncate_size=4)
    assert torch.allclose(torch.tensor(got), changed["model.norm.weight"][:4])
    # Flat bucket back to the original values.
    flat = flatten([("model.norm.weight", state["model.norm.weight"])], shared=True)
    client.update_weights_from_tensor([encode_named_tensors([], "flattened_bucket", flat)], "flattened_bucket",
                                      weight_version="t2")
    assert same(scored(client), fingerprint)
    # From disk: the whole model, with an index file.
    disk = tmp_path / "disk"
    disk.mkdir()
    save_file(state, str(disk / "model-00001.safetensors"))
    (disk / "model.safetensors.index.json").write_text(
        '{"weight_map": {%s}}' % ", ".join(f'"{k}": "model-00001.safetensors"' for k in state))
    client.update_weights_from_disk(str(disk), weight_version=version)
    assert client.weight_version() == version and same(scored(client), fingerprint)


def test_pause_holds_generation_until_continue(client):
    req = GenerateRequest((PROMPTS[1],), SamplingParams(max_new_tokens=2, temperature=0))
    client.pause()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (client.generate(req), done.set()))
    worker.start()
    try:
        assert not done.wait(1.5), "generation ran while paused"
    finally:
        client.continue_generation()
    assert done.wait(30)
    worker.join()


def test_release_resume_refuses_generation_until_all_weights_pushed(client, model_dir):
    state = hf_state(model_dir)
    fingerprint = scored(client)
    version = client.weight_version()
    client.release_memory()
    with pytest.raises(EngineError, match="503"):
        client.generate(GenerateRequest((PROMPTS[0],), SamplingParams(max_new_tokens=1)))
    client.resume_memory()
    names = list(state)
    client.update_weights_from_tensor([encode_named_tensors([(n, state[n]) for n in names[:3]])])
    with pytest.raises(EngineError, match="not loaded since resume"):
        client.generate(GenerateRequest((PROMPTS[0],), SamplingParams(max_new_tokens=1)))
    assert requests.get(client.url + P.HEALTH, timeout=10).status_code == 503
    client.update_weights_from_tensor([encode_named_tensors([(n, state[n]) for n in names[3:]])],
                                      weight_version=version)
    assert same(scored(client), fingerprint)


def test_openai_completions_route(smollm2_dir, tmp_path):
    with launch_embedded(smollm2_dir, log_path=tmp_path / "smol.log", threads=2, api_key=None) as srv:
        reply = requests.post(srv.url + P.COMPLETIONS, timeout=120, json={
            "prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4, "temperature": 0, "logprobs": 1})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        usage = body["usage"]
        assert len(body["choices"]) == 2 and usage["completion_tokens"] == 8
        assert usage["total_tokens"] == usage["prompt_tokens"] + 8 and body["model"] == str(smollm2_dir)
        assert "Paris" in body["choices"][0]["text"]
        assert len(body["choices"][1]["logprobs"]["token_logprobs"]) == 4
        assert body["metadata"]["weight_version"] == "default"  # where SGLang reports it
        missing = requests.post(srv.url + P.COMPLETIONS, json={"max_tokens": 2}, timeout=10)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_crafted_shared_memory_handles_and_oversized_requests_are_refused(server, client, tmp_path):
    import torch.multiprocessing.reductions as reductions

    victim = "/dev/shm/megatron_spin_test_victim"
    with open(victim, "wb") as f:
        f.write(b"secret" * 100)
    try:
        class Crafted:  # what a hostile peer would send: torch's own rebuild, someone else's segment
            def __reduce__(self):
                return (reductions.rebuild_storage_filename,
                        (torch.UntypedStorage, b"/tmp/x/manager.sock", b"/megatron_spin_test_victim", 600))

        payload = base64.b64encode(pickle.dumps([("model.norm.weight", Crafted())])).decode()
        reply = requests.post(server.url + P.UPDATE_FROM_TENSOR, headers={"Authorization": f"Bearer {KEY}"},
                              json={"serialized_named_tensors": [payload]}, timeout=30)
        assert reply.status_code == 400 and "refusing shared-memory handle" in reply.json()["message"]
        assert os.path.exists(victim)  # neither mapped nor unlinked
    finally:
        os.unlink(victim)
    two = [encode_named_tensors([("model.norm.weight", torch.ones(64))])] * 2
    with pytest.raises(EngineError, match="one entry per engine TP rank"):
        client.update_weights_from_tensor(two)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.post(server.url + P.GENERATE, data=b"x" * (65 * 1024**2), headers=auth,
                         timeout=60).status_code == 413
    assert requests.post(server.url + P.GENERATE, json=[1, 2], headers=auth, timeout=10).status_code == 400
    with pytest.raises(EngineError, match="at most 1024"):
        client.generate(GenerateRequest(PROMPTS, SamplingParams(n=600, max_new_tokens=1)))
    with pytest.raises(EngineError, match="exceed the model's context of 128"):
        client.generate(GenerateRequest(PROMPTS, SamplingParams(max_new_tokens=125)))


def test_client_retries_are_bounded_and_name_the_engine():
    from megatron_spin.parallel.launch import free_port

    port = free_port()  # nothing listens here
    client = EngineClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.1)
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        client.flush_cache()
    assert f"127.0.0.1:{port}/flush_cache" in str(info.value) and "after 3 attempts" in str(info.value)
    assert 0.25 <= time.monotonic() - started < 10  # two backoffs (0.1 + 0.2 s), then gave up


# --------------------------------------------------------------------------- behaving like SGLang
def test_weight_update_session_rules_as_sglang(server, model_dir):
    """Updates need a session, a second begin is refused (400, as SGLang 0.5.21), and the client
    recovers a session a failed push left open."""
    c = server.client(retries=0)
    norm = hf_state(model_dir)["model.norm.weight"]
    payload = [encode_named_tensors([("model.norm.weight", norm.clone())])]
    with pytest.raises(EngineError, match=r"400: update_weights_from_tensor must run between begin_weight_update\(\)"):
        c.update_weights_from_tensor(payload)
    with pytest.raises(EngineError, match="400: no weight-update session is open"):
        c.request("POST", P.END_WEIGHT_UPDATE, {}, retries=0)
    c.request("POST", P.BEGIN_WEIGHT_UPDATE, {"selector": "all"}, retries=0)
    with pytest.raises(EngineError, match="400: a weight-update session is already open"):
        c.request("POST", P.BEGIN_WEIGHT_UPDATE, {"selector": "all"}, retries=0)
    c.begin_weight_update()  # the session left open is closed and a fresh one opened
    assert c.update_weights_from_tensor(payload).success
    c.end_weight_update()
    assert c.request("GET", "/get_server_info")["weight_update_session"] is False
    c.close()


def test_health_fails_while_paused_but_the_liveness_probe_answers(server):
    """SGLang's /health generates a token, so a paused engine fails it; re-admission probes
    /model_info instead, so an engine a failed push left paused comes back."""
    from megatron_spin.rollout.fleet import RolloutFleet

    c = server.client(retries=0)
    fleet = RolloutFleet([server.client(retries=0)])
    c.pause()
    try:
        assert not c.healthy() and c.alive()
        fleet.drop(fleet.slots[0], EngineError(server.url, "/generate", "simulated"))
        assert fleet.probe() == [server.url] and fleet.slots[0].needs_sync
    finally:
        c.continue_generation()
        fleet.close()
        c.close()
    assert c.healthy()


def test_memory_tags_must_be_released_before_resumed(server):
    c = server.client(retries=0)
    c.release_memory(["kv_cache"])
    with pytest.raises(EngineError, match=r"400: resume_memory_occupation: \['weights'\] not released"):
        c.resume_memory(["weights"])
    with pytest.raises(EngineError, match="unknown memory tags"):
        c.release_memory(["everything"])
    c.resume_memory(["kv_cache"])
    with pytest.raises(EngineError, match=r"\['kv_cache'\] not released"):
        c.resume_memory(["kv_cache"])  # SGLang's scheduler dies on this one
    assert c.request("GET", "/get_server_info")["released_tags"] == []
    c.close()


def test_simulated_devices_refuse_a_bucket_from_a_device_the_rank_does_not_hold(model_dir, tmp_path):
    """An engine simulating two TP ranks on cpu:0 and cpu:1 takes one payload per rank, each from
    that rank's device, all carrying the same tensors — as SGLang opens a CUDA handle only from a
    GPU it can see."""
    from megatron_spin.wire.bucket import flatten

    norm = hf_state(model_dir)["model.norm.weight"]
    named = [("model.norm.weight", norm * 0.5)]
    flat = flatten(named, shared=True)

    def bucket(device, tensors=named, buf=flat):
        return encode_named_tensors(tensors, "flattened_bucket", buf, device=device)

    with launch_embedded(model_dir, api_key=KEY, log_path=tmp_path / "e.log", threads=1,
                         device_ids=["cpu:0", "cpu:1"]) as srv:
        c = srv.client(retries=0)
        c.begin_weight_update()
        cases = {
            "swapped devices": ([bucket("cpu:1"), bucket("cpu:0")], "from device 'cpu:1', which this engine rank does not hold"),
            "untagged": ([bucket(None), bucket("cpu:1")], "from device None"),
            "one rank only": ([bucket("cpu:0")], "one entry per engine TP rank; this engine has 2"),
            "ranks differ": ([bucket("cpu:0"), bucket("cpu:1", [("model.norm.weight", norm)], flatten([("model.norm.weight", norm)], shared=True))],
                             "TP rank 1's payload differs from rank 0's"),
        }
        for what, (payload, expect) in cases.items():
            with pytest.raises(EngineError, match="400") as info:
                c.update_weights_from_tensor(payload, "flattened_bucket")
            assert expect in str(info.value), (what, str(info.value))
        assert c.update_weights_from_tensor([bucket("cpu:0"), bucket("cpu:1")], "flattened_bucket").success
        got = c.get_weights_by_name("model.norm.weight", truncate_size=norm.numel())
        assert torch.allclose(torch.tensor(got), norm * 0.5)
        c.end_weight_update()
        c.close()


def test_per_sample_seeds_give_reproducible_distinct_samples(server):
    """The client asks a seeded request's n samples as n seeded copies (what SGLang needs for
    one seed per sample); the engine answers them, the same twice, different across samples."""
    c = server.client(retries=0, per_sample_seeds=True)
    req = GenerateRequest(PROMPTS, SamplingParams(max_new_tokens=8, n=4, seed=11, temperature=1.0))
    first, again = c.generate(req), c.generate(req)
    assert [[x.output_ids for x in g] for g in first] == [[x.output_ids for x in g] for g in again]
    assert [[(x.prompt_index, x.sample_index) for x in g] for g in first] == [[(i, j) for j in range(4)]
                                                                             for i in range(len(PROMPTS))]
    assert all(len({x.output_ids for x in g}) > 1 for g in first)  # not one shared seed
    c.close()
