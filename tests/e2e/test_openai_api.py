"""The embedded engine's OpenAI-compatible routes, driven by the official ``openai`` client over
real HTTP on 127.0.0.1 — the client code that also talks to SGLang.

One engine (a tiny random Llama with SmolLM2's tokenizer and chat template, API key set, served
as ``tiny-chat``) serves the module.  The random model writes gibberish, so tests that need a
particular text take it from a first request (seeded sampling reproduces it) rather than hoping
for one.  Log-probs are compared with a plain HF forward of the same weights.
"""

from __future__ import annotations

import time

import openai
import pytest
import requests
import torch

from megatron_spin.rollout.launcher import launch_embedded

pytestmark = [pytest.mark.timeout(300)]

KEY = "openai-test-key"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai-log") / "engine.log"
    with launch_embedded(tiny_chat_model, api_key=KEY, log_path=log, threads=1,
                         engine_args=["--served-model-name", NAME]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf(tiny_chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_chat_model)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T-1,) log p(ids[t] | ids[:t]) for t >= 1, fp32, one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def server_info(server) -> dict:
    return requests.get(server.url + "/get_server_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.model_extra["max_model_len"] == 256 and card.owned_by == "megatron_spin"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("some-other-model")


def test_completion_text_usage_and_identity(client, hf):
    _, tok = hf
    r = client.completions.create(model="whatever-name", prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == NAME
    assert abs(r.created - time.time()) < 300
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and isinstance(choice.text, str)
    prompt_tokens = len(tok("The capital of France is")["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, 5, prompt_tokens + 5)
    assert r.model_extra["metadata"]["weight_version"] == "default"


def test_stop_string_cuts_the_text_and_stops_generation(client):
    """A seeded sample is reproduced with a stop string taken from its own middle: the text ends
    just before the string's first occurrence, the reason is "stop", and fewer tokens were made."""
    ask = dict(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=3)
    full = client.completions.create(**ask).choices[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    start = len(full.text) // 3
    stop = full.text[start:start + 3]
    expected = full.text[:full.text.find(stop)]
    r = client.completions.create(**ask, stop=[stop, "zz-never-zz"], logprobs=1)
    (choice,) = r.choices
    assert choice.text == expected and choice.finish_reason == "stop"
    assert r.usage.completion_tokens < 16  # stopped early, not cut after the fact
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) <= r.usage.completion_tokens
    assert all(o < len(expected) for o in lp.text_offset) and lp.text_offset == sorted(lp.text_offset)
    as_string = client.completions.create(**ask, stop=stop).choices[0]  # a single string works too
    assert as_string.text == expected


def test_n_samples_and_seed_reproducibility(client):
    ask = dict(model=NAME, prompt=["A list of fruits:", "Numbers:"], max_tokens=6, temperature=1.0, n=2, seed=11)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]  # prompt-major, n per prompt
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # two samples of one prompt differ
    other = client.completions.create(**{**ask, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    assert first.usage.completion_tokens == 4 * 6


def test_logprobs_top_k_and_offsets_match_the_model(client, hf):
    model, tok = hf
    prompt = "Hello world, this is"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) == 3 for top in lp.top_logprobs)
    # Greedy: each chosen token is the best one, with exactly its log-prob (lm-eval's is_greedy test).
    assert all(t == max(top.values()) for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():  # HF's own greedy continuation: the engine must have chosen the same tokens
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    generated = ids[-4:]
    assert lp.tokens == [tok.decode([t]) for t in generated]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), hf_logprobs(model, ids)[-4:], atol=1e-4, rtol=0)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text == tok.decode(generated, skip_special_tokens=True)


def test_echo_scores_the_prompt_like_hf_and_lm_eval_reads_it(client, hf):
    """echo + logprobs + max_tokens=0: the prompt's own log-probs (first one null), equal to HF's
    log-softmax; and the reply to lm-eval's loglikelihood payload parses to HF's sum."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tok = hf
    prompts = [tok("The quick brown fox jumps")["input_ids"], tok("over the lazy dog.")["input_ids"]]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    for ids, choice in zip(prompts, r.choices):
        lp = choice.logprobs
        assert choice.text == tok.decode(ids, skip_special_tokens=True) and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), hf_logprobs(model, ids), atol=1e-4, rtol=0)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, prompts))

    context, continuation = tok("The quick brown")["input_ids"], tok(" fox jumps", add_special_tokens=False)["input_ids"]
    payload = {"model": NAME, "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}  # what lm-eval's local-completions sends for loglikelihood
    body = requests.post(f"{client.base_url}completions", json=payload, timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"}).json()
    ((total, greedy),) = LocalCompletionsAPI.parse_logprobs(body, ctxlens=[len(context)])
    ref = hf_logprobs(model, context + continuation)[len(context) - 1:]
    assert total == pytest.approx(ref.sum().item(), abs=1e-3)
    with torch.no_grad():
        best = model(torch.tensor([context + continuation])).logits[0, len(context) - 1:-1].argmax(-1)
    assert greedy == (best.tolist() == continuation)


def test_chat_completion_and_its_stream_agree(client, hf):
    _, tok = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    (choice,) = r.choices
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    prompt_tokens = len(tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (prompt_tokens, prompt_tokens + r.usage.completion_tokens)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens

    chat_lp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0,
                                             logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(chat_lp) == 3 and all(len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob
                                     for e in chat_lp)


def test_streamed_completion_with_echo_and_stop_adds_up_to_the_plain_reply(client):
    ask = dict(model=NAME, prompt="Dear diary,", max_tokens=12, temperature=1.0, seed=5, echo=True)
    plain = client.completions.create(**ask).choices[0].text
    stop = plain[len("Dear diary,") + 4:][:2]
    plain = client.completions.create(**ask, stop=stop).choices[0]
    chunks = list(client.completions.create(**ask, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason == "stop"


def test_refused_fields_and_a_wrong_key(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, presence_penalty=0.5)
    assert info.value.body["param"] == "presence_penalty" and info.value.body["type"] == "invalid_request_error"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=300)
    assert info.value.body["param"] == "max_tokens" and "context is 256" in info.value.body["message"]
    # Harmless fields pass, at their neutral values too.
    assert client.completions.create(model=NAME, prompt="x", max_tokens=1, user="u", presence_penalty=0,
                                     best_of=1, logit_bias={}).choices
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="x", max_tokens=1)
    wrong.close()


def test_a_client_that_leaves_mid_stream_abandons_its_generation(client, server):
    before = server_info(server)["abandoned_requests"]
    # Several seconds of work: 256 greedy samples of 200 tokens.
    stream = client.completions.create(model=NAME, prompt=[[1, 2, 3]], max_tokens=200, n=256, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # the reply has started
    stream.close()  # hang up
    deadline = time.monotonic() + 30
    while server_info(server)["abandoned_requests"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_info(server)["abandoned_requests"] == before + 1
    started = time.monotonic()
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).choices
    assert time.monotonic() - started < 10, "the next request waited behind abandoned work"
