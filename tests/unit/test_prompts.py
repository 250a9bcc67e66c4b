"""Prompt files (JSONL, Parquet), chat-template encoding with length filtering, resumable order."""

from __future__ import annotations

import json

import pytest

from megatron_spin.data.preference_file import DataFileError
from megatron_spin.data.prompts import (
    EncodedPrompt, PromptKeys, PromptLoader, PromptRecord, encode_prompts, read_prompt_file,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_and_parquet_read_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "What is 2+2?", "gt": "4.", "answer": 4, "source_dataset": "basic_arithmetic"},
            {"question": "Say hi", "gt": None, "answer": None, "source_dataset": None}]
    keys = PromptKeys(prompt="question", response="gt")
    a = read_prompt_file(write_jsonl(tmp_path / "p.jsonl", rows), keys)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    b = read_prompt_file(tmp_path / "p.parquet", keys)
    for r in (a, b):
        assert [x.prompt for x in r] == ["What is 2+2?", "Say hi"]
        assert r[0].response == "4." and r[0].answer == "4" and r[0].metadata["source_dataset"] == "basic_arithmetic"
        assert r[1].response is None and r[1].answer is None
    assert a[1].where.endswith("p.jsonl:2") and b[1].where.endswith("p.parquet:row 1")


@pytest.mark.parametrize("line,message", [
    ("{not json", "p.jsonl:2: invalid JSON"),
    ('{"text": "x"}', "p.jsonl:2: missing key 'prompt'"),
    ('{"prompt": "  "}', "p.jsonl:2: 'prompt' is empty"),
    ('{"prompt": 3}', "p.jsonl:2: 'prompt' must be a string or a list"),
    ('{"prompt": "x", "response": 5}', "p.jsonl:2: 'response' must be a string"),
    ('[1, 2]', "p.jsonl:2: expected an object"),
    ('{"prompt": "a\\u0000b"}', r"p.jsonl:2: 'prompt' contains a NUL character \(\\u0000\) at position 1"),
    ('{"prompt": [{"role": "user", "content": ["a"]}]}', r"p.jsonl:2: 'prompt\[0\].content' must be a string, got list"),
    ('{"prompt": [{"content": "hi"}]}', r"p.jsonl:2: 'prompt\[0\]' has no 'role'"),
    ('{"prompt": [{"role": 1, "content": "hi"}]}', r"p.jsonl:2: 'prompt\[0\].role' must be a string"),
    ('{"prompt": ["hi"]}', r"p.jsonl:2: 'prompt\[0\]' must be a chat message object"),
    ('{"prompt": "x", "response": "y\\u0000"}', r"p.jsonl:2: 'response' contains a NUL"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(DataFileError, match=message):
        read_prompt_file(path)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataFileError, match="no such prompt file"):
        read_prompt_file(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataFileError, match="no records"):
        read_prompt_file(tmp_path / "e.jsonl")
    with pytest.raises(DataFileError, match=f"{tmp_path}: is a directory, not a prompt file"):
        read_prompt_file(tmp_path)
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(DataFileError, match="unsupported prompt file type '.csv'"):
        read_prompt_file(tmp_path / "p.csv")


def test_chat_template_encoding_and_length_filter(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    records = [PromptRecord("Hi", "a"), PromptRecord("word " * 200, "b"),
               PromptRecord([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "c"),
               PromptRecord("Hi", "d", response="Hello there, " * 40)]
    kept, report = encode_prompts(records, tok, max_prompt_length=64, max_response_length=32, truth=True)
    assert (report.total, report.kept, report.too_long, report.response_too_long) == (4, 2, 1, 1)
    assert "2/4 prompts kept" in str(report)
    # A run that never trains on the ground truth (online DPO) loses no prompt to a long one.
    others, report = encode_prompts(records, tok, max_prompt_length=64, max_response_length=32)
    assert (report.kept, report.response_too_long) == (3, 0) and others[2].response_ids is None
    plain = kept[0].input_ids
    assert tok.decode(plain).count("<|im_start|>assistant") == 1  # generation prompt appended
    assert "Be brief." in tok.decode(kept[1].input_ids)
    assert records[2].text == "Hi"
    kept, _ = encode_prompts(records[3:], tok, max_prompt_length=64, truth=True)
    assert kept[0].response_ids[-1] == tok.eos_token_id


def test_plain_prompt_format_takes_the_texts_own_tokens(smollm2_dir):
    """data.prompt_format=plain: no chat template and no special token (base models; the TRL
    benchmark's workload); a chat-message prompt is refused naming its file and line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    kept, _ = encode_prompts([PromptRecord("The movie was", "f.jsonl:1")], tok, max_prompt_length=64, chat=False)
    assert list(kept[0].input_ids) == tok("The movie was", add_special_tokens=False)["input_ids"]
    assert "<|im_start|>" not in tok.decode(kept[0].input_ids)
    chat = PromptRecord([{"role": "user", "content": "Hi"}], "f.jsonl:7")
    with pytest.raises(DataFileError, match=r"f\.jsonl:7: prompt_format=plain needs string prompts"):
        encode_prompts([chat], tok, max_prompt_length=64, chat=False)


def _prompts(n):
    return [EncodedPrompt(PromptRecord(f"p{i}", f"f:{i}"), (i,)) for i in range(n)]


def test_loader_order_is_seeded_wraps_epochs_and_resumes_exactly():
    a = PromptLoader(_prompts(10), batch_size=4, seed=3)
    batches = [[p.input_ids[0] for p in a.next_batch()] for _ in range(5)]  # 20 prompts: two epochs
    first_epoch = batches[0] + batches[1] + batches[2][:2]
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    assert sorted(batches[2][2:] + batches[3] + batches[4]) == list(range(10))
    assert batches[0] == [p.input_ids[0] for p in PromptLoader(_prompts(10), 4, seed=3).next_batch()]  # same seed
    assert PromptLoader(_prompts(10), 4, seed=4).next_batch() != PromptLoader(_prompts(10), 4, seed=3).next_batch()

    straight = PromptLoader(_prompts(10), 4, seed=3)
    resumed = PromptLoader(_prompts(10), 4, seed=3)
    for _ in range(3):
        straight.next_batch()
        resumed.next_batch()
    state = json.loads(json.dumps(resumed.state_dict()))  # survives serialisation
    fresh = PromptLoader(_prompts(10), 4, seed=3)
    fresh.load_state_dict(state)
    assert [fresh.next_batch() for _ in range(4)] == [straight.next_batch() for _ in range(4)]
    with pytest.raises(DataFileError, match="does not match"):
        PromptLoader(_prompts(9), 4, seed=3).load_state_dict(state)


def test_unshuffled_order_and_empty_loader():
    loader = PromptLoader(_prompts(3), batch_size=2, shuffle=False)
    assert [[p.input_ids[0] for p in loader.next_batch()] for _ in range(3)] == [[0, 1], [2, 0], [1, 2]]
    with pytest.raises(DataFileError, match="no prompts left"):
        PromptLoader([], 2)


def test_a_file_that_is_not_utf8_is_named_with_line_and_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, as spreadsheets export
    with pytest.raises(DataFileError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_prompt_file(path)


def test_a_chat_template_error_names_the_record(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataFileError, match=r"f.jsonl:3: the tokenizer's chat template refused the messages "
                                            r"\(roles must alternate\)"):
        encode_prompts([PromptRecord([{"role": "user", "content": "Hi"}], "f.jsonl:3")], tok, max_prompt_length=64)
