"""Precision / FP8Settings validation, their TransformerConfig kwargs, and the start-up refusal
of FP8 where TransformerEngine + CUDA are absent.

A bad value is a ConfigError keyed by the field (relative to the record: the loader anchors it
under ``actor_rollout_ref.actor.precision``); a precision this machine cannot run is a
PrecisionError, itself a ConfigError."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_spin import platform
from megatron_spin.errors import ConfigError
from megatron_spin.models.builder import build_transformer_config, check_precision
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.precision import FP8Settings, Precision, PrecisionError

ARCH = ModelArch(
    family="llama", hf_architecture="LlamaForCausalLM", num_layers=2, hidden_size=32,
    ffn_hidden_size=48, num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64,
    max_position_embeddings=64, rope_theta=10000.0, rope_scaling_factor=None, norm_eps=1e-5,
    tie_word_embeddings=False, qkv_bias=False,
)


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16)])
def test_params_dtype_accepted(name, dtype):
    assert Precision(params_dtype=name).torch_dtype == dtype


@pytest.mark.parametrize("bad", ["fp32", "bf16", "float64", "int8", ""])
def test_bad_params_dtype(bad):
    with pytest.raises(ConfigError) as info:
        Precision(params_dtype=bad)
    assert info.value.key == "params_dtype"
    assert str(info.value) == f"params_dtype: one of float32, bfloat16, float16; got {bad!r}"


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        (dict(format="e5m2"), "one of e4m3, hybrid; got 'e5m2'"),
        (dict(format="E4M3"), "one of e4m3, hybrid; got 'E4M3'"),
        (dict(recipe="per_tensor"), "one of delayed, tensorwise, blockwise, mxfp8; got 'per_tensor'"),
        (dict(amax_compute_algo="mean"), "one of max, most_recent; got 'mean'"),
        (dict(amax_history_len=0), "must be >= 1, got 0"),
        (dict(amax_history_len=-3), "must be >= 1, got -3"),
    ],
)
def test_bad_fp8_settings(kwargs, rule):
    (key, value), = kwargs.items()
    with pytest.raises(ConfigError) as info:
        FP8Settings(**kwargs)
    assert info.value.key == key
    assert str(info.value) == f"{key}: {rule}"
    assert str(value) in str(info.value)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_good_fp8_settings(recipe, fmt):
    s = FP8Settings(format=fmt, recipe=recipe, amax_history_len=1, amax_compute_algo="most_recent")
    assert (s.format, s.recipe, s.amax_history_len) == (fmt, recipe, 1)


# ---------------------------------------------------------------------------------------------
# TransformerConfig kwargs


def test_kwargs_without_fp8():
    kw = Precision().transformer_config_kwargs()
    assert kw == {"params_dtype": torch.float32, "pipeline_dtype": torch.float32,
                  "bf16": False, "fp16": False}
    assert not any(k.startswith("fp8") for k in kw)


def test_kwargs_bf16_and_fp16_flags():
    bf = Precision(params_dtype="bfloat16").transformer_config_kwargs()
    assert (bf["params_dtype"], bf["pipeline_dtype"], bf["bf16"], bf["fp16"]) == (
        torch.bfloat16, torch.bfloat16, True, False)
    fp = Precision(params_dtype="float16").transformer_config_kwargs()
    assert (fp["params_dtype"], fp["bf16"], fp["fp16"]) == (torch.float16, False, True)


def test_kwargs_map_fp8_settings_to_transformer_config_fields():
    fp8 = FP8Settings(format="e4m3", recipe="tensorwise", amax_history_len=16,
                      amax_compute_algo="most_recent", margin=2)
    kw = Precision(params_dtype="bfloat16", fp8=fp8).transformer_config_kwargs()
    assert kw["fp8"] == "e4m3"
    assert kw["fp8_recipe"] == "tensorwise"
    assert kw["fp8_margin"] == 2
    assert kw["fp8_amax_history_len"] == 16
    assert kw["fp8_amax_compute_algo"] == "most_recent"
    assert kw["bf16"] is True


def test_fp8_kwarg_names_are_transformer_config_fields():
    """Names checked against megatron-core's TransformerConfig source (no import: it is slow)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("megatron.core")
    assert spec is not None and spec.origin is not None
    source = (pathlib.Path(spec.origin).parent / "transformer" / "transformer_config.py").read_text()
    source += (pathlib.Path(spec.origin).parent / "model_parallel_config.py").read_text()
    kw = Precision(fp8=FP8Settings()).transformer_config_kwargs()
    for name in kw:
        assert f"\n    {name}:" in source, f"{name} is not a TransformerConfig field"


# ---------------------------------------------------------------------------------------------
# refusal on this machine


def test_this_machine_has_no_te():
    plat = platform.current()
    assert plat.device == "cpu" and not plat.has_te  # CPU-only project CI (DESIGN.md)


def test_precision_error_is_a_config_error():
    assert issubclass(PrecisionError, ConfigError)


def test_check_precision_refuses_fp8_without_te():
    with pytest.raises(PrecisionError) as info:
        check_precision(Precision(fp8=FP8Settings()), platform.current())
    msg = str(info.value)
    assert info.value.key == "fp8" and msg.startswith("fp8: ")
    assert "TransformerEngine" in msg
    assert "device=cpu" in msg


def test_check_precision_allows_plain_precisions_everywhere():
    for dtype in ("float32", "bfloat16", "float16"):
        check_precision(Precision(params_dtype=dtype), platform.current())


def test_check_precision_allows_fp8_with_te():
    gpu = platform.Platform(device="cuda", backend="nccl", has_te=True)
    assert check_precision(Precision(fp8=FP8Settings()), gpu) is None
    cuda_no_te = platform.Platform(device="cuda", backend="nccl", has_te=False)
    with pytest.raises(PrecisionError, match=r"^fp8: .*TransformerEngine.*device=cuda"):
        check_precision(Precision(fp8=FP8Settings()), cuda_no_te)


def _poisoned_transformer_config(monkeypatch) -> list:
    """Replace megatron's TransformerConfig with a recorder (also skips its slow import)."""
    constructed: list = []

    class TransformerConfig:
        def __init__(self, **kwargs):
            constructed.append(kwargs)

    mod = types.ModuleType("megatron.core.transformer.transformer_config")
    mod.TransformerConfig = TransformerConfig
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return constructed


def test_build_transformer_config_refuses_fp8_before_building(monkeypatch):
    constructed = _poisoned_transformer_config(monkeypatch)

    def no_alloc(*a, **k):
        raise AssertionError("a tensor was allocated before the precision check")

    monkeypatch.setattr(torch, "empty", no_alloc)
    monkeypatch.setattr(torch, "zeros", no_alloc)
    with pytest.raises(PrecisionError, match=r"^fp8: .*TransformerEngine"):
        build_transformer_config(ARCH, ParallelLayout(), Precision(fp8=FP8Settings(recipe="mxfp8")))
    assert constructed == []


def test_build_transformer_config_passes_precision_through(monkeypatch):
    """The same stub shows the non-fp8 path does reach TransformerConfig with the precision kwargs."""
    constructed = _poisoned_transformer_config(monkeypatch)
    build_transformer_config(ARCH, ParallelLayout(), Precision(params_dtype="bfloat16"))
    assert len(constructed) == 1
    kw = constructed[0]
    assert kw["params_dtype"] is torch.bfloat16 and kw["bf16"] is True
    assert "fp8" not in kw
    assert (kw["num_attention_heads"], kw["num_query_groups"], kw["kv_channels"]) == (4, 2, 8)
