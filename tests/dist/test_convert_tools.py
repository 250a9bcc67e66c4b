"""The conversion and parity command-line tools, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_tiny_hf

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]


def run_tool(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_roundtrip_is_bit_exact_in_bf16(tmp_path, family, tied):
    hf = make_tiny_hf(tmp_path / "hf", family, tied)
    # Store the source in bf16 so that a silent fp32 detour would show up as a dtype change.
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(hf / "model.safetensors").items()}
    from safetensors.torch import save_file

    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m", "--tp", 2, "--pp", 2)
    assert r.returncode == 0, r.stderr
    r = run_tool("convert_megatron_to_hf.py", "--megatron-dir", tmp_path / "m", "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == weights.keys()
    for name, t in weights.items():
        assert back[name].dtype == t.dtype and torch.equal(_bits(back[name]), _bits(t)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.config.tie_word_embeddings == tied


def test_check_parity_tool_reports_and_exits_by_tolerance(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=False)
    assert run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m").returncode == 0
    ok = run_tool("check_parity.py", "--hf-dir", hf, "--megatron-dir", tmp_path / "m", "--tp", 2)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "max |logit diff|" in ok.stdout and "OK" in ok.stdout
    # TP=2 splits matmuls, so fp32 rounding differs from HF by ~1e-7: a 1e-12 tolerance must fail.
    strict = run_tool("check_parity.py", "--hf-dir", hf, "--megatron-dir", tmp_path / "m", "--tp", 2,
                      "--tol", "1e-12")
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_convert_rejects_a_layout_before_writing(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")  # 4 heads, 2 KV heads, 2 layers
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m", "--tp", 4)
    assert r.returncode == 2 and "num_key_value_heads % TP == 0" in r.stderr
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m", "--pp", 3)
    assert r.returncode == 2 and "num_layers % PP == 0" in r.stderr
    assert not (tmp_path / "m").exists()


def test_convert_refuses_to_overwrite_and_leaves_no_partial_output(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    (tmp_path / "m").mkdir()
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m")
    assert r.returncode == 2 and "--force" in r.stderr
    # A checkpoint missing a tensor fails naming it, and leaves nothing behind.
    weights = load_file(hf / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "m2")
    assert r.returncode == 2 and "model.layers.1.mlp.up_proj.weight" in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m2")] == []
    assert not (tmp_path / "m2").exists()
