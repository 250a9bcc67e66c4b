"""The planner's per-rank parameter counts equal what Megatron-core actually allocates.

Real GPTModels (the repo's builder, on the meta device: shapes only, no memory) for tiny
Llama, Qwen2 and Qwen3 architectures, tied and untied, two with a vocabulary TP=2 does not divide
(padded), at TP1/PP1, TP2/PP1, TP1/PP2, TP2/PP2 and PP2×VPP2, all in one 4-rank gloo launch
(smaller layouts use data parallelism over the spare ranks).  Every rank compares ``sum(p.numel())`` over its chunks with
``plan.params.rank_params`` for its pipeline stage.  In the same launch a tiny Qwen3-MoE model
runs at those layouts (EP = 1) and at EP = 2 and 4 with TP and PP (EP ranks are DP ranks: DP % EP
== 0); there the parameters Megatron marks expert-parallel (``allreduce=False``, what the
distributed optimizer shards over expert-DP only) must also equal ``plan.params.rank_expert_params``.
"""

from __future__ import annotations

import pytest

from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import make_arch

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

LAYOUTS = {
    "tp1pp1": ParallelLayout(1, 1),
    "tp2pp1": ParallelLayout(2, 1),
    "tp1pp2": ParallelLayout(1, 2),
    "tp2pp2": ParallelLayout(2, 2),
    "pp2vpp2": ParallelLayout(1, 2, vpp=2),
}
ARCHS = {
    "llama-untied": make_arch(),
    "llama-tied": make_arch(tie_word_embeddings=True),
    "qwen2-tied": make_arch(family="qwen2", hf_architecture="Qwen2ForCausalLM", qkv_bias=True,
                            tie_word_embeddings=True),
    # per-head q/k norms (replicated over TP), head_dim 16 != hidden 64 / 8 heads
    "qwen3-untied": make_arch(family="qwen3", hf_architecture="Qwen3ForCausalLM", qk_layernorm=True, head_dim=16),
    "mha-untied": make_arch(num_kv_heads=8, ffn_hidden_size=128),
    # 257 tokens: padded to 512 rows at TP=2 (embedding and output layer both count the padding)
    "oddvocab-untied": make_arch(vocab_size=257),
    "oddvocab-tied": make_arch(vocab_size=257, tie_word_embeddings=True),
}
# 4 experts of 48 (divisible by TP 2), top 2; Qwen3's q/k norms and head_dim 16.
MOE = make_arch(family="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM", qk_layernorm=True, head_dim=16,
                num_experts=4, moe_top_k=2, moe_ffn_hidden_size=48)
MOE_LAYOUTS = {
    **LAYOUTS,
    "ep2": ParallelLayout(1, 1, ep=2),
    "ep4": ParallelLayout(1, 1, ep=4),
    "tp2ep2": ParallelLayout(2, 1, ep=2),
    "pp2ep2": ParallelLayout(1, 2, ep=2),
}


def _count_params(rank, world_size, archs, layouts, moe, moe_layouts):
    """{(arch, layout): (pp_rank, tp_rank, actual numel, planned numel)} on this rank; for the MoE
    model also {("moe-experts", layout): (..., actual expert-parallel numel, planned)}."""
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.plan.params import rank_expert_params, rank_params

    out = {}
    for lname, layout in moe_layouts.items():
        pctx = init_parallel(layout)
        for aname, arch in {**(archs if lname in layouts else {}), "moe": moe}.items():
            chunks = build_model(arch, pctx, init_weights=False, on_meta=True)
            params = [p for c in chunks for p in c.parameters()]
            out[(aname, lname)] = (pctx.pp_rank, pctx.tp_rank, sum(p.numel() for p in params),
                                   rank_params(arch, layout, pctx.pp_rank))
            if aname == "moe":
                # Megatron marks expert weights allreduce=False only when EP > 1 (tensor_parallel/layers.py);
                # at EP = 1 they are ordinary data-parallel weights, and DP/EP = DP shards them the same.
                expert = sum(p.numel() for p in params if not getattr(p, "allreduce", True))
                planned = rank_expert_params(arch, layout, pctx.pp_rank) if layout.ep > 1 else 0
                out[("moe-experts", lname)] = (pctx.pp_rank, pctx.tp_rank, expert, planned)
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def counts():
    return launch(_count_params, world_size=4, args=(ARCHS, LAYOUTS, MOE, MOE_LAYOUTS), timeout=180)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_rank_params_match_megatron(counts, arch, layout):
    for rank, per_rank in enumerate(counts):
        pp_rank, tp_rank, actual, planned = per_rank[(arch, layout)]
        assert planned == actual, f"rank {rank} (pp {pp_rank}, tp {tp_rank}): planned {planned}, Megatron {actual}"


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("part", ["moe", "moe-experts"])
def test_moe_rank_params_match_megatron(counts, part, layout):
    """All parameters of a rank, and its expert-parallel ones: router replicated, E/EP experts split over TP."""
    for rank, per_rank in enumerate(counts):
        pp_rank, tp_rank, actual, planned = per_rank[(part, layout)]
        assert planned == actual, f"rank {rank} (pp {pp_rank}, tp {tp_rank}): planned {planned}, Megatron {actual}"


def test_stages_sum_to_the_model_when_untied(counts):
    """Untied: the stages' parameters (× TP shards) add up to the HF model's unique count."""
    from megatron_spin.plan.params import model_params

    arch = ARCHS["llama-untied"]
    for lname, layout in LAYOUTS.items():
        seen = {}
        for per_rank in counts:
            pp_rank, tp_rank, actual, _ = per_rank[("llama-untied", lname)]
            seen[(pp_rank, tp_rank)] = actual
        replicated = 2 * arch.hidden_size * arch.num_layers + arch.hidden_size  # norms, held by every TP rank
        sharded = sum(seen.values()) - replicated * (layout.tp - 1)
        assert sharded == model_params(arch), lname


def test_padded_vocabulary_adds_exactly_the_padded_rows(counts):
    """257 tokens at TP=2: Megatron allocates 512 - 257 = 255 extra rows per vocabulary table."""
    odd, even = ARCHS["oddvocab-untied"], ARCHS["llama-untied"]
    for per_rank in counts:
        pp_rank, tp_rank, actual, _ = per_rank[("oddvocab-untied", "tp2pp1")]
        _, _, base, _ = per_rank[("llama-untied", "tp2pp1")]
        # two tables (embedding, output layer), each 512 rows over 2 ranks instead of 256
        assert actual - base == 2 * (512 - 256) // 2 * odd.hidden_size, (actual, base)
    assert even.vocab_size == 256
