"""``megatron-spin-serve`` on a trained run, talked to by the clients users already have.

One tiny online run (the tiny random Llama with SmolLM2's tokenizer and chat template) writes
its final checkpoint; the serve command exports it and starts the embedded engine; the official
``openai`` client chats with it, and EleutherAI's ``lm-eval`` scores a multiple-choice task
from a local JSON file through it (``local-completions``: prompt log-likelihoods from
``echo`` + ``logprobs``) — every log-likelihood equal to the same task scored in-process by
lm-eval's ``hf`` model on the exported HF weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_online import run_cli, write_prompts

pytestmark = [pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tiny_chat_model, spin_cache, tmp_path_factory):
    """One update of the tiny model from the command line; the run directory (final checkpoint at step 1)."""
    tmp = tmp_path_factory.mktemp("serve")
    train = write_prompts(tmp / "train.jsonl", 4)
    run_dir = tmp / "run"
    run_cli(tmp, f"actor_rollout_ref.model.path={tiny_chat_model}", f"data.train_files=[{train}]",
            f"data.val_files=[{train}]", "data.val_size=1", "data.train_batch_size=2", "data.max_response_length=6",
            "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.micro_pairs=1", "reward_model.type=function",
            "reward_model.function=tests.e2e.test_online:length_reward", "trainer.total_training_steps=1",
            "actor_rollout_ref.actor.optim.lr=1e-2", f"trainer.default_local_dir={run_dir}",
            "algorithm.pairs.ties=first", cache=spin_cache)  # a pair per prompt even when the lengths tie
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    return run_dir


def start_serve(path, *args, env=None):
    """``megatron-spin-serve PATH --port 0``: (process, url, key, the lines it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spin.serve", str(path), "--port", "0", "--threads", "1",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    lines, url, key = [], None, None
    deadline = time.monotonic() + 300
    while key is None:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "serve ended before it served:\n" + "".join(lines)
        lines.append(line)
        if line.startswith("[serve] url:"):
            url = line.split()[-1]
        elif line.startswith("[serve] api key:"):
            key = line.split()[-1]
    return proc, url, key, lines


def stop_serve(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(trained_run):
    proc, url, key, lines = start_serve(trained_run)
    yield url, key, lines
    assert stop_serve(proc) == 0


def test_serve_exports_the_latest_checkpoint_and_answers_a_chat(served, trained_run):
    import openai
    from transformers import AutoModelForCausalLM

    url, key, lines = served
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    export = trained_run / "exports" / "step_00000001"
    assert any(str(export) in line for line in lines)
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [f"{trained_run.name}/step_00000001"]
    reply = client.chat.completions.create(model=f"{trained_run.name}/step_00000001", max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me about the number 3."}])
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="not-the-key", max_retries=0).models.list()
    # The export is the trained weights, not the initial ones: it differs from the model the run started from.
    trained = AutoModelForCausalLM.from_pretrained(export).state_dict()
    config = json.loads((trained_run / "config.json").read_text())
    initial = AutoModelForCausalLM.from_pretrained(config["actor_rollout_ref"]["model"]["path"]).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not (trained[k] == initial[k]).all() for k in trained)


def test_a_second_serve_reuses_the_export_and_a_bad_path_is_named(served, trained_run, tmp_path):
    export = trained_run / "exports" / "step_00000001"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    checkpoint = trained_run / "checkpoints" / "step_00000001"  # the checkpoint itself: same export
    proc, url, key, lines = start_serve(checkpoint)
    try:
        assert any("unchanged since" in line for line in lines), "".join(lines)
        assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    finally:
        assert stop_serve(proc) == 0
    bad = subprocess.run([sys.executable, "-m", "megatron_spin.serve", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and f"{tmp_path}: not a run directory" in bad.stderr
    open_host = subprocess.run([sys.executable, "-m", "megatron_spin.serve", str(trained_run), "--host", "0.0.0.0"],
                               capture_output=True, text=True, timeout=120,
                               env={**{k: v for k, v in os.environ.items() if k != "MEGATRON_SPIN_ENGINE_API_KEY"},
                                    "PYTHONPATH": str(REPO)})
    assert open_host.returncode == 2 and "give --api-key" in open_host.stderr


TASK_YAML = """\
task: spin_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

QUESTIONS = [
    ("Which number is even?", [" three", " four", " seven"], 1),
    ("What colour is the sky on a clear day?", [" blue", " green"], 0),
    ("How many legs does a cat have?", [" two", " four", " six"], 1),
    ("Which is a fruit?", [" apple", " chair", " river"], 0),
    ("What is the opposite of hot?", [" cold", " warm"], 0),
]


def test_lm_eval_through_the_server_equals_in_process_scoring(served, trained_run, tmp_path):
    """lm-eval's ``local-completions`` against the served checkpoint, and its ``hf`` model on
    the same exported weights in this process: the same log-likelihood for every choice."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, key, _ = served
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "spin_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    export = trained_run / "exports" / "step_00000001"
    os.environ["OPENAI_API_KEY"] = key  # lm-eval's local-completions reads the key from here
    try:
        def scores(model, model_args):
            out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["spin_local_mc"],
                                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                          batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
            samples = sorted(out["samples"]["spin_local_mc"], key=lambda s: s["doc_id"])
            return out["results"]["spin_local_mc"]["acc,none"], [[r[0] for r in s["resps"]] for s in samples]

        served_acc, served_ll = scores("local-completions", {
            "model": f"{trained_run.name}/step_00000001", "base_url": f"{url}/completions",
            "tokenizer_backend": "huggingface", "tokenizer": str(export), "num_concurrent": 1, "max_retries": 1})
        local_acc, local_ll = scores("hf", {"pretrained": str(export), "dtype": "float32", "device": "cpu"})
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
    assert [len(x) for x in served_ll] == [len(c) for _, c, _ in QUESTIONS]
    for got, want in zip(served_ll, local_ll):
        for (g, _), (w, _) in zip(got, want):
            assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), (got, want)
    assert served_acc == local_acc
