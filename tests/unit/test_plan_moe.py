"""The planner on mixture-of-experts models: parameter counts (total, active, per rank and the
expert-parallel share), the optimizer's expert-DP sharding, MoE activations, FLOPs, the EP
dimension of the search and the report, against hand-computed values and Qwen3-30B-A3B's
published sizes.  (Per-rank counts against real Megatron MoE models: tests/dist/test_plan_params.py.)"""

from __future__ import annotations

import json

import pytest

from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.plan import activations as act
from megatron_spin.plan.memory import TrainSetup, estimate
from megatron_spin.plan.models import published_arch
from megatron_spin.plan.params import (active_params, layer_expert_params, layer_params, model_params,
                                       rank_expert_params, rank_params)
from megatron_spin.plan.preset import PlanRequest, load_plan_input
from megatron_spin.plan.search import enumerate_candidates, expert_parallel_sizes
from megatron_spin.spec import flops as fl
from tests.conftest import make_arch
from tests.unit.test_plan import _plan_main

# h 64, 8 heads / 4 KV heads of 8, 8 layers, vocab 256, untied; 4 experts of 48, top 2.
MOE = make_arch(family="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM", qk_layernorm=True,
                num_experts=4, moe_top_k=2, moe_ffn_hidden_size=48)
Q30 = published_arch("qwen3-30b-a3b")

ATTN = (8 + 2 * 4) * 8 * 64 + 64 * 8 * 8  # QKV 8192 + proj 4096
NORMS = 2 * 64 + 2 * 8  # input and pre-MLP RMSNorm, q/k norms
ROUTER = 4 * 64
EXPERT = 3 * 48 * 64  # gate, up, down: 9216
EMB = 256 * 64


def setup(**kw) -> TrainSetup:
    base = dict(layout=ParallelLayout(1, 1), dp=1, precision="bfloat16", optimizer="adam", sgd_momentum=0.0,
                distributed_optimizer=False, recompute=False, reference=True, ref_offload=False, seq_len=128,
                micro_seqs=2, micro_batches=8, gpu_mem_gib=80.0, overhead_gib=0.0)
    return TrainSetup(**{**base, **kw})


# -- parameters --------------------------------------------------------------------------------
def test_moe_layer_params_by_hand():
    assert layer_params(MOE) == ATTN + NORMS + ROUTER + 4 * EXPERT
    # TP 2: attention and every expert split, router and norms replicated; EP 2: 2 of 4 experts
    assert layer_params(MOE, tp=2) == ATTN // 2 + NORMS + ROUTER + 4 * EXPERT // 2
    assert layer_params(MOE, tp=2, ep=2) == ATTN // 2 + NORMS + ROUTER + 2 * EXPERT // 2
    assert layer_expert_params(MOE, tp=2, ep=2) == 2 * EXPERT // 2
    assert layer_expert_params(make_arch()) == 0  # dense: no expert-parallel weights


def test_moe_rank_params_by_hand():
    lay = ParallelLayout(1, 2, ep=4)  # 4 layers per stage, 1 expert per layer per rank
    per_layer = ATTN + NORMS + ROUTER + EXPERT
    assert rank_params(MOE, lay, 0) == 4 * per_layer + EMB
    assert rank_params(MOE, lay, 1) == 4 * per_layer + 64 + EMB  # final norm + output layer
    assert rank_expert_params(MOE, lay, 0) == rank_expert_params(MOE, lay, 1) == 4 * EXPERT
    assert rank_expert_params(make_arch(), ParallelLayout(1, 2), 0) == 0


def test_moe_total_and_active_params_by_hand():
    assert model_params(MOE) == 8 * (ATTN + NORMS + ROUTER + 4 * EXPERT) + 2 * EMB + 64
    # a token goes through the router and k = 2 of the 4 experts
    assert active_params(MOE) == 8 * (ATTN + NORMS + ROUTER + 2 * EXPERT) + 2 * EMB + 64
    dense = make_arch()
    assert active_params(dense) == model_params(dense)


def test_qwen3_30b_a3b_has_its_published_sizes():
    """Model card: 30.5 B parameters, 3.3 B activated, 29.9 B non-embedding.  The card gives one
    decimal place, so the total and non-embedding counts must round to it (|x − card| < 0.05 B).
    For the active count it does not say whether the input embedding (a look-up, 0.31 B here)
    is included; counted like the total (both tables) it is 3.35 B, so the bound is one unit of
    the card's last digit, 0.1 B."""
    assert model_params(Q30) == 30_532_122_624  # exact: 48 × 623,120,640 per layer + 2 × 151936 × 2048 + 2048
    assert abs(model_params(Q30) - 30.5e9) < 0.05e9
    assert abs(model_params(Q30) - 2 * 151936 * 2048 - 29.9e9) < 0.05e9
    assert abs(active_params(Q30) - 3.3e9) < 0.1e9


# -- FLOPs --------------------------------------------------------------------------------------
def test_moe_flops_count_router_and_top_k_experts():
    matmul = 8 * (ATTN + ROUTER + 2 * EXPERT) + 64 * 256
    assert fl.matmul_params_per_token(MOE) == matmul
    # Qwen3-30B-A3B: attention + router (128·2048) + 8 experts, all 48 layers, + the output layer
    q30 = 48 * (40 * 128 * 2048 + 32 * 128 * 2048 + 128 * 2048 + 8 * 3 * 768 * 2048) + 2048 * 151936
    assert fl.matmul_params_per_token(Q30) == q30 == 3_041_656_832


# -- memory -------------------------------------------------------------------------------------
def test_distributed_optimizer_shards_experts_over_expert_dp_only():
    """DP 4, EP 2: dense weights over 4 ranks, experts over DP/EP = 2 (megatron-core's expert optimizer)."""
    lay = ParallelLayout(1, 1, ep=2)
    n, n_exp = rank_params(MOE, lay, 0), rank_expert_params(MOE, lay, 0)
    st = estimate(MOE, setup(layout=lay, dp=4, distributed_optimizer=True)).stages[0]
    assert st.params == n and st.expert_params == n_exp == 8 * 2 * EXPERT
    assert st.items["optimizer"] == 12 * (n - n_exp) / 4 + 12 * n_exp / 2
    assert (st.items["weights"], st.items["gradients"]) == (2 * n, 4 * n)
    plain = estimate(MOE, setup(layout=lay, dp=4)).stages[0]
    assert plain.items["optimizer"] == 12 * n  # unsharded: every parameter held


def test_moe_activation_terms_by_hand():
    """k = 2 routes per token: expert SwiGLU 2·3·f_e·k·s·b/t, expert fc1 inputs 2·k·s·b·h (gathered
    over TP), router fp32 scores and int64 indices s·b·(4E + 8k); TP 2 adds sequence parallelism."""
    s, b, sb = 16, 2, 32
    t1 = act.layer_terms(MOE, s, b, 1)
    assert t1["mlp"] == 2 * sb * 3 * 48 * 2
    assert t1["expert_inputs"] == 2 * sb * 64 * 2
    assert t1["router"] == sb * (4 * 4 + 8 * 2)
    assert t1["norm_inputs"] == t1["qkv_fc1_inputs"] == 2 * sb * 64 * 2
    t2 = act.layer_terms(MOE, s, b, 2)
    assert t2["norm_inputs"] == t1["norm_inputs"] / 2  # SP: replicated terms split over TP
    assert t2["expert_inputs"] == t1["expert_inputs"]  # all-gathered over TP: not split
    assert t2["mlp"] == t1["mlp"] / 2
    assert act.checkpoint_bytes(MOE, s, b, 2, tp=2) == sb * 64 * 2 / 2
    dense = make_arch()
    assert "expert_inputs" not in act.layer_terms(dense, s, b, 2)
    assert act.checkpoint_bytes(dense, s, b, 2, tp=2) == sb * 64 * 2  # dense trains without SP
    assert act.dispatch_bytes(MOE, s, b) == 2 * 2 * sb * 64 * 2 and act.dispatch_bytes(dense, s, b) == 0


def test_moe_train_phase_is_the_sum_of_its_items():
    st = estimate(MOE, setup(layout=ParallelLayout(2, 2, ep=2), dp=2, distributed_optimizer=True)).stages[1]
    assert st.items["moe_dispatch"] == act.dispatch_bytes(MOE, 128, 2) > 0
    assert st.phases["train"] == pytest.approx(sum(st.items.values()), rel=1e-12)
    assert "moe_dispatch" not in estimate(make_arch(), setup()).stages[0].items


# -- search and report --------------------------------------------------------------------------
def test_expert_parallel_sizes():
    assert expert_parallel_sizes(MOE, 4) == [1, 2, 4]
    assert expert_parallel_sizes(MOE, 6) == [1, 2]  # DP % EP == 0 as well as E % EP == 0
    assert expert_parallel_sizes(make_arch(), 8) == [1]


def test_search_enumerates_ep_for_moe_only():
    inp = load_plan_input(PlanRequest(preset="spin_8b", model="qwen3-30b-a3b", gpu_mem_gib=141))
    cands = enumerate_candidates(inp)
    eps = {c.setup.layout.ep for c in cands}
    assert eps == {1, 2, 4, 8}  # 8 GPUs: DP up to 8
    for c in cands:
        lay = c.setup.layout
        assert c.setup.dp % lay.ep == 0 and 128 % lay.ep == 0 and 768 % lay.tp == 0
    dense = load_plan_input(PlanRequest(preset="spin_8b", gpu_mem_gib=80))
    assert {c.setup.layout.ep for c in enumerate_candidates(dense)} == {1}


def test_cli_prints_ep_for_moe_models(capsys):
    assert _plan_main()(["--preset", "spin_8b", "--model", "qwen3-30b-a3b", "--gpu-mem-gb", "141"]) == 0
    text = capsys.readouterr().out
    assert "MoE 128 SwiGLU experts of 768, top-8" in text and "3.35 B active per token" in text
    assert "Requested layout TP2 PP2 EP1 DP2" in text and "of which experts [M]" in text
    rows = text.split("Layouts that fit")[1].splitlines()[2:]
    assert rows and all(" EP" in r for r in rows if r.strip()[:1].isdigit())
    assert _plan_main()(["--preset", "spin_8b", "--model", "qwen3-30b-a3b", "--gpu-mem-gb", "141", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["active_params"] == active_params(Q30) and plan["requested"]["ep"] == 1
    assert any(c["ep"] > 1 for c in plan["candidates"])
    assert _plan_main()(["--preset", "spin_8b", "--gpu-mem-gb", "80"]) == 0
    assert " EP" not in capsys.readouterr().out  # dense: no EP column content
