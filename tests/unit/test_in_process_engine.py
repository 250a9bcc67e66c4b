"""The embedded engine inside its owner's process (transport ``shared``): binding the owner's
tensors, the HTTP server on a thread, and forks of the owner (a real server on 127.0.0.1, a
tiny real HF model as the owner)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.rollout.embedded.in_process import InProcessEngine, empty_hf_model
from megatron_spin.rollout.protocol import GenerateRequest, ProtocolError, SamplingParams
from megatron_spin.wire.tensor_payload import PayloadError
from tests.conftest import make_tiny_hf

KEY = "in-process-key"


def _owner(tmp_path, tied: bool):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=tied)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    named = [(n, p.detach()) for n, p in model.named_parameters()]  # tied weights appear once
    return hf, model, named


def _logprobs(client: EngineClient, ids):
    """The engine's log-probs of ``ids[1:]`` given the prefixes (one greedy token, prompt scored)."""
    request = GenerateRequest(input_ids=(tuple(ids),), sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
                              return_logprob=True, logprob_start_len=0)
    (reply,) = client.generate(request, timeout=30)
    return torch.tensor([lp for lp in reply[0].input_logprobs if lp is not None])


def _reference(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("tied", [False, True])
def test_empty_model_has_real_buffers_and_keeps_ties(tmp_path, tied):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=tied)
    model = empty_hf_model(str(hf), torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    inv_freq = dict(model.named_buffers())["model.rotary_emb.inv_freq"]
    assert not inv_freq.is_meta and inv_freq[0] == 1.0  # theta^0: computed, not left empty


@pytest.mark.parametrize("tied", [False, True])
def test_engine_serves_the_owners_tensors_in_place(tmp_path, tied):
    hf, model, named = _owner(tmp_path, tied)
    served = InProcessEngine.start(str(hf), named, api_key=KEY)
    try:
        engine_params = dict(served.engine.model.named_parameters())
        assert all(engine_params[n].data_ptr() == t.data_ptr() for n, t in named)  # no copy at all
        client = EngineClient(served.url, api_key=KEY)
        ids = [3, 17, 99, 4, 250, 8, 31]
        assert torch.allclose(_logprobs(client, ids), _reference(model, ids), atol=1e-5)
        with torch.no_grad():  # the owner changes its weights in place: the engine serves them at once
            for p in model.parameters():
                p.mul_(1.5)
        assert torch.allclose(_logprobs(client, ids), _reference(model, ids), atol=1e-5)
        client.close()
    finally:
        served.stop()


def test_share_copies_what_is_not_a_whole_contiguous_tensor(tmp_path):
    hf, model, named = _owner(tmp_path, tied=False)
    served = InProcessEngine.start(str(hf), named, api_key=KEY)
    try:
        engine = served.engine
        name = "model.layers.0.self_attn.q_proj.weight"
        fresh = torch.randn(64, 64)
        transposed = fresh.t().contiguous().t()  # same values, not contiguous: must be copied
        with pytest.raises(ProtocolError, match="between begin_weight_update"):
            engine.share_weights([(name, transposed)])
        engine.begin_weight_update()
        in_place, updated = engine.share_weights([(name, transposed)], weight_version="7")
        param = dict(engine.model.named_parameters())[name]
        assert (in_place, updated) == (0, fresh.numel() * 4)
        assert torch.equal(param, fresh) and param.data_ptr() != transposed.data_ptr()
        # An unchanged binding is in place: nothing updated.
        embed = dict(named)["model.embed_tokens.weight"]
        assert engine.share_weights([("model.embed_tokens.weight", embed)]) == (embed.numel() * 4, 0)
        # A bad request changes nothing (checked whole first).
        before = param.clone()
        with pytest.raises(PayloadError, match="shape"):
            engine.share_weights([(name, torch.zeros(64, 64)), ("model.norm.weight", torch.zeros(3))])
        assert torch.equal(param, before) and engine.weight_version == "7"
        engine.end_weight_update()
    finally:
        served.stop()


def test_a_forked_child_does_not_keep_the_servers_connections(tmp_path):
    """The child of a fork (Megatron's checkpoint writer, in a rank) must not hold the server's
    keep-alive connection: once the server closes it, the client must see it closed."""
    hf, _, named = _owner(tmp_path, tied=True)
    served = InProcessEngine.start(str(hf), named, api_key=KEY)
    client = EngineClient(served.url, api_key=KEY)
    request = GenerateRequest(input_ids=((1, 2, 3),), sampling=SamplingParams(max_new_tokens=2, seed=1))
    child = None
    try:
        client.generate(request, timeout=30)  # opens the keep-alive connection
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only waits
            time.sleep(60)
            os._exit(0)
        time.sleep(6.5)  # past uvicorn's 5 s keep-alive: the server closes its end
        try:
            client.generate(request, timeout=20)
        except EngineError as exc:  # a closed connection is retried; a dead one times out
            pytest.fail(f"the request after the fork got no answer: {exc}")
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        client.close()
        served.stop()


def test_an_engine_on_shared_weights_refuses_copies_and_non_finite_values(tmp_path):
    """A copy into a shared parameter would rewrite the owner's tensor behind its optimizer: the
    copying routes are refused; a tensor that cannot be shared gets fresh storage, the owner's
    stays as it was; NaN is refused before anything changes."""
    hf, model, named = _owner(tmp_path, tied=False)
    served = InProcessEngine.start(str(hf), named, api_key=KEY)
    try:
        engine = served.engine
        with pytest.raises(ProtocolError, match="in place"):
            engine.update_from_disk(str(hf), "2")
        with pytest.raises(ProtocolError, match="in place"):
            engine.update_from_tensor([], None, "2")
        owner = dict(named)["model.layers.1.mlp.down_proj.weight"]
        kept = owner.clone()
        engine.begin_weight_update()
        name = "model.layers.1.mlp.down_proj.weight"
        engine.share_weights([(name, (owner * 2).t().contiguous().t())])  # not contiguous: copied
        assert torch.equal(owner, kept)  # the owner's tensor untouched
        assert torch.equal(dict(engine.model.named_parameters())[name], kept * 2)
        bad = owner.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(PayloadError, match="NaN"):
            engine.share_weights([(name, bad)], weight_version="9")
        assert torch.equal(dict(engine.model.named_parameters())[name], kept * 2) and engine.weight_version != "9"
        engine.end_weight_update()
    finally:
        served.stop()


def test_the_engine_reads_the_generation_config_as_from_pretrained_does(tmp_path):
    from transformers import GenerationConfig

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    GenerationConfig(eos_token_id=[7, 9]).save_pretrained(hf)  # end-of-turn ids only this file names
    assert empty_hf_model(str(hf), torch.float32).generation_config.eos_token_id == [7, 9]
