"""Seeding an optimizer without state before a save, for the two Adam families megatron-core builds.

torch's AdamW (CPU installs) gets a per-parameter ``step`` with its zero moments; TE's FusedAdam
(GPU installs with TE) keeps its step in the param group and gets only the moments, from
Megatron's own ``init_state_fn``.  FusedAdam needs CUDA and TE: here a stand-in class with TE's
module path plays it (a fake, named as such) — what is checked is the dispatch.
"""

from __future__ import annotations

import types

import torch

from megatron_spin.train.checkpoint import _fused_adam, _seed_state


def _member(inner):
    calls = []

    def init_state_fn(opt, config=None):  # what megatron-core's Adam init_state_fn does
        calls.append(config)
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    return types.SimpleNamespace(optimizer=inner, init_state_fn=init_state_fn, config="cfg"), calls


def test_torch_adamw_gets_a_step_per_parameter():
    p = torch.nn.Parameter(torch.ones(3))
    member, calls = _member(torch.optim.AdamW([p], lr=0.1))
    _seed_state(member)
    state = member.optimizer.state[p]
    assert calls == [] and float(state["step"]) == 0.0 and torch.equal(state["exp_avg"], torch.zeros(3))
    member.optimizer.zero_grad()
    p.grad = torch.ones(3)
    member.optimizer.step()  # a seeded state is exactly what the first step would have created
    assert float(state["step"]) == 1.0


def test_fused_adam_is_seeded_by_megatrons_init_and_keeps_its_group_step():
    FakeFusedAdam = type("FusedAdam", (torch.optim.Optimizer,), {  # stand-in for TE's (GPU only)
        "__module__": "transformer_engine.pytorch.optimizers.fused_adam",
        "__init__": lambda self, params: torch.optim.Optimizer.__init__(self, params, {"lr": 0.1})})
    p = torch.nn.Parameter(torch.ones(3))
    inner = FakeFusedAdam([p])
    assert _fused_adam(inner) and not _fused_adam(torch.optim.AdamW([p]))
    member, calls = _member(inner)
    _seed_state(member)
    assert calls == ["cfg"] and set(inner.state[p]) == {"exp_avg", "exp_avg_sq"}
    assert "step" not in inner.param_groups[0]  # the fused step counts from the group: untouched
