"""Reward sources: VADER, reasoning-gym answers, HF reward model, HTTP scorer, dotted function."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_spin.errors import ConfigError
from megatron_spin.reward import RewardConfig, RewardError, RewardInput, build_reward
from megatron_spin.reward.rules import extract_answer
from tests.conftest import send_json


def inputs(*responses, reference=None, prompt="p", metadata=None):
    return [RewardInput(prompt, r, reference, metadata or {}) for r in responses]


def test_vader_orders_sentiment():
    reward = build_reward(RewardConfig(type="vader"))
    good, neutral, bad = reward(inputs("A wonderful, moving film. I loved it!", "The film is 90 minutes long.",
                                       "Dull, lifeless and painfully boring."))
    assert good > 0.5 and bad < -0.5 and abs(neutral) < 0.1


def test_extract_answer():
    assert extract_answer("so it is <answer> -4 </answer>.") == "-4"
    assert extract_answer("<answer>1</answer> no wait <answer>2</answer>") == "2"
    assert extract_answer("first 3 then 17.5 and finally 2/3") == "2/3"
    assert extract_answer("no digits here") is None


def test_math_answers_scored_by_reasoning_gym():
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=5))
    reward = build_reward(RewardConfig(type="math"))
    xs = []
    for e in entries:
        meta = dict(e["metadata"])
        xs += [RewardInput(e["question"], f"Let me think. <answer>{e['answer']}</answer>", e["answer"], meta),
               RewardInput(e["question"], f"It is {int(e['answer']) + 1}", e["answer"], meta),
               RewardInput(e["question"], "I do not know", e["answer"], meta)]
    assert reward(xs) == [1.0, 0.0, 0.0] * 3
    with pytest.raises(RewardError, match="no reference answer"):
        reward(inputs("<answer>1</answer>"))
    with pytest.raises(RewardError, match="no task 'nope'"):
        reward(inputs("<answer>1</answer>", reference="1", metadata={"source_dataset": "nope"}))


def length_reward(prompt, response, reference):
    return float(len(response))


def batched_reward(batch):
    return [1.0 if x.reference and x.reference in x.response else 0.0 for x in batch]


def nan_reward(prompt, response, reference):
    return float("nan")


def test_function_reward_by_dotted_path():
    per_sample = build_reward(RewardConfig(type="function", function="tests.unit.test_reward:length_reward"))
    assert per_sample(inputs("ab", "abcd")) == [2.0, 4.0]
    batched = build_reward(RewardConfig(type="function", function="tests.unit.test_reward.batched_reward",
                                        batched=True))
    assert batched(inputs("the answer is 42", "no", reference="42")) == [1.0, 0.0]
    with pytest.raises(RewardError, match="is nan"):
        build_reward(RewardConfig(type="function", function="tests.unit.test_reward:nan_reward"))(inputs("x"))
    with pytest.raises(RewardError, match="cannot import 'no_such_module'"):
        build_reward(RewardConfig(type="function", function="no_such_module:f"))
    with pytest.raises(RewardError, match="no callable 'missing'"):
        build_reward(RewardConfig(type="function", function="tests.unit.test_reward:missing"))


class _Scorer(BaseHTTPRequestHandler):
    """A real HTTP scorer: reward = number of 'good' in the response; fails on demand."""

    failures_left = 0
    requests_seen = 0

    def do_POST(self):
        type(self).requests_seen += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        if self.path == "/bad":
            payload = {"rewards": [1.0]}
        else:
            payload = {"rewards": [x["response"].count("good") for x in body["inputs"]]}
        send_json(self, 200, payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scorer.failures_left, _Scorer.requests_seen = 0, 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_reward_batches_and_retries(scorer_url):
    reward = build_reward(RewardConfig(type="http", url=scorer_url + "/score", batch_size=2, retries=2))
    _Scorer.failures_left = 2  # two 503s, then success: within the retry budget
    assert reward(inputs("good", "good good", "bad", "good good good", "")) == [1.0, 2.0, 0.0, 3.0, 0.0]
    assert _Scorer.requests_seen == 2 + 3  # 3 batches of <= 2, the first after 2 failures


def test_http_reward_gives_up_and_names_the_url(scorer_url):
    reward = build_reward(RewardConfig(type="http", url=scorer_url + "/score", retries=1))
    reward.backoff = 0.01
    _Scorer.failures_left = 5
    with pytest.raises(RewardError, match=r"/score: HTTP 503 \(after 2 attempts\)"):
        reward(inputs("good"))
    with pytest.raises(RewardError, match="expected 'rewards' with 2 numbers"):
        build_reward(RewardConfig(type="http", url=scorer_url + "/bad"))(inputs("a", "b"))


def test_hf_reward_model_batches_like_single_samples(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    xs = inputs("Short.", "A much longer response that needs padding in a batch with the short one.", "Mid length text.")
    batched = build_reward(RewardConfig(type="hf", path=str(tmp_path / "rm"), batch_size=3))(xs)
    single = build_reward(RewardConfig(type="hf", path=str(tmp_path / "rm"), batch_size=1))(xs)
    assert len(set(batched)) == 3
    assert batched == pytest.approx(single, abs=1e-5)


@pytest.mark.parametrize("kw,key,rule", [
    (dict(type="nope"), "type", "one of vader, math, hf, http, function; got 'nope'"),
    (dict(type="hf"), "path", "required with type=hf"),
    (dict(type="http"), "url", "required with type=http"),
    (dict(type="function"), "function", "required with type=function"),
    (dict(batch_size=0), "batch_size", "must be >= 1, got 0"),
    (dict(num_workers=0), "num_workers", "must be >= 1, got 0"),
    (dict(type="http", url="http://x", timeout=0), "timeout", "must be > 0, got 0"),
    (dict(retries=-1), "retries", "must be >= 0, got -1"),
])
def test_reward_config_errors_name_the_key(kw, key, rule):
    # Keys are relative to the record; the loader reports them under reward_model. (test_run_config.py).
    with pytest.raises(ConfigError) as info:
        RewardConfig(**kw)
    assert info.value.key == key
    assert str(info.value) == f"{key}: {rule}"
