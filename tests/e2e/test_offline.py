"""Offline mode end to end: a JSONL preference file trains the actor at TP=2 and the held-out
preference set is learned (loss falls, implicit-reward accuracy rises)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spin.loss.config import LossConfig
from megatron_spin.train.config import BatchConfig, OptimConfig
from megatron_spin.convert.hf_io import copy_side_files
from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.data.preference_file import DataFileError, read_preference_jsonl
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.train.offline import OfflineConfig, train_offline
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [pytest.mark.timeout(900)]

MOVIES = ["the heist film", "the space opera", "the courtroom drama", "the ghost story", "the road movie",
          "the musical", "the war epic", "the romantic comedy", "the spy thriller", "the documentary"]
GOOD = ["I loved {m}; it was wonderful, warm and moving.", "{m} was brilliant and beautifully acted.",
        "What a delightful surprise {m} turned out to be!"]
BAD = ["{m} was dull, boring and far too long.", "I hated {m}; a tedious, clumsy mess.",
       "{m} was an awful waste of two hours."]


def write_preferences(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            m = rng.choice(MOVIES)
            f.write(json.dumps({"prompt": f"Give me your opinion of {m} (#{seed}-{i}).",
                                "chosen": rng.choice(GOOD).format(m=m), "rejected": rng.choice(BAD).format(m=m)}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    hf = make_tiny_hf(root / "hf", "llama", tied=True, layers=2, vocab_size=49152)
    copy_side_files(smollm2_dir, hf, names=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                            "special_tokens_map.json"))
    convert_hf_to_megatron(hf, root / "mcore", log=lambda *_: None)
    return root


def test_offline_training_learns_held_out_preferences(tiny_with_tokenizer):
    root = tiny_with_tokenizer
    cfg = OfflineConfig(
        megatron_dir=str(root / "mcore"),
        train_file=str(write_preferences(root / "train.jsonl", 16, seed=1)),
        eval_file=str(write_preferences(root / "eval.jsonl", 8, seed=2)),
        layout=ParallelLayout(2, 1),
        batch=BatchConfig(global_pairs=8, micro_pairs=2),
        optim=OptimConfig(optimizer="adam", lr=3e-3, clip_grad=1.0),
        loss=LossConfig(loss_type="sigmoid", beta=0.1),
        epochs=4,
        save_dir=str(root / "trained"),
    )
    history = train_offline(cfg, timeout=LAUNCH_TIMEOUT)
    evals = [h for h in history if "eval/loss" in h]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 8 and len(evals) == 5
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05
    assert evals[0]["eval/reward_accuracy"] == 0.0 and evals[-1]["eval/reward_accuracy"] >= 0.75
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["response_tokens"] > 8 * 2 * 5  # a total over the 8 pairs' 16 responses
    # The trained actor was published as a checkpoint that exports to a loadable HF model.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_spin.convert.pipeline import convert_megatron_to_hf

    convert_megatron_to_hf(root / "trained", root / "trained_hf", log=lambda *_: None)
    AutoModelForCausalLM.from_pretrained(root / "trained_hf")
    before, after = load_file(root / "hf" / "model.safetensors"), load_file(root / "trained_hf" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)
    for key in ("grad_norm", "lr", "reward_margin", "logps_chosen", "logps_rejected", "response_tokens", "pairs/dataset"):
        assert key in steps[0], key


def test_preference_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: missing key 'rejected'"):
        read_preference_jsonl(bad)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\nnot json\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:3: invalid JSON"):
        read_preference_jsonl(bad)
    bad.write_text('{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:1: 'chosen' is empty"):
        read_preference_jsonl(bad)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": " ", "chosen": "b", "rejected": "c"}', r"p.jsonl:2: 'prompt' is empty"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', r"p.jsonl:2: 'prompt\[0\]' has no 'content'"),
    ('{"prompt": [{"role": "user", "content": 7}], "chosen": "b", "rejected": "c"}',
     r"p.jsonl:2: 'prompt\[0\].content' must be a string, got int"),
    ('{"prompt": "a", "chosen": "b\\u0000", "rejected": "c"}', r"p.jsonl:2: 'chosen' contains a NUL character"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', r"p.jsonl:2: 'rejected' must be a string, got int"),
])
def test_preference_records_are_checked_like_prompts(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    with pytest.raises(DataFileError, match=message):
        read_preference_jsonl(path)


def test_preference_file_encoding_directory_and_identical_pairs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(DataFileError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xff at column 13\)"):
        read_preference_jsonl(path)
    with pytest.raises(DataFileError, match="is a directory, not a preference file"):
        read_preference_jsonl(tmp_path)
    # chosen == rejected teaches nothing (zero DPO gradient): dropped and counted, never trained on.
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "same", "rejected": "same"}\n')
    records, identical = read_preference_jsonl(path)
    assert [r.where for r in records] == [f"{path}:1"] and identical == 1
    path.write_text('{"prompt": "a", "chosen": "same", "rejected": "same"}\n')
    with pytest.raises(DataFileError, match=r"p.jsonl: no records \(1 with chosen == rejected, dropped\)"):
        read_preference_jsonl(path)


def test_the_offline_tool_reports_a_data_error_in_one_line_before_any_rank_starts(tiny_with_tokenizer, tmp_path):
    ckpt = tiny_with_tokenizer / "mcore"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": [{"content": "x"}], "chosen": "b", "rejected": "c"}\n')
    tool = Path(__file__).resolve().parents[2] / "tools" / "train_offline.py"
    done = subprocess.run([sys.executable, str(tool), "--megatron-dir", str(ckpt), "--train-file", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {bad}:2: 'prompt[0]' has no 'role'", done.stderr
