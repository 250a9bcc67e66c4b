"""Weight-first linear layers (platform/cpu_linear.py) compute what nn.Linear computes, in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_spin.platform import cpu_linear, prepare_inference_model
from megatron_spin.platform.cpu_linear import WeightFirstLinear, orient_linears
from tests.conftest import make_tiny_hf

TOL = 1e-5  # fp32: two GEMM kernels sum in different orders


@pytest.mark.parametrize("shape", [(16, 48), (3, 1, 48), (2, 5, 48), (0, 48), (48,)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = WeightFirstLinear(48, 80, bias=bias)
    x = torch.randn(shape)
    got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()


def test_many_rows_fall_back_to_f_linear():
    layer = WeightFirstLinear(8, 4)
    x = torch.randn(cpu_linear.MAX_ROWS + 1, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_gradients_flow_as_through_nn_linear():
    torch.manual_seed(1)
    layer = WeightFirstLinear(12, 20)
    x = torch.randn(4, 12, requires_grad=True)
    layer(x).square().sum().backward()
    got = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    layer.zero_grad()
    F.linear(x, layer.weight, layer.bias).square().sum().backward()
    for g, w in zip(got, (x.grad, layer.weight.grad, layer.bias.grad)):
        assert torch.allclose(g, w, atol=TOL, rtol=0)


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False)])  # qwen2: q/k/v biases
def test_oriented_hf_model_keeps_its_parameters_and_logits(tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf(tmp_path / "hf", family, tied)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    names = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())

    assert orient_linears(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert {n: p for n, p in model.named_parameters()} == names  # the same Parameter objects
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    assert orient_linears(model) == 0  # idempotent


def test_prepare_inference_model_orients_a_cpu_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_hf(tmp_path / "hf"), dtype=torch.float32)
    prepare_inference_model(model)
    assert isinstance(model.lm_head, WeightFirstLinear)
