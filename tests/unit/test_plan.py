"""The layout planner: counts, memory and FLOPs against hand-computed values, the paper's
closed form, and the CLI on the real presets (valid, invalid, JSON)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.plan import activations as act
from megatron_spin.spec import flops as fl
from megatron_spin.plan.memory import GIB, TrainSetup, estimate, optimizer_bytes_per_param
from megatron_spin.plan.models import published_arch
from megatron_spin.plan.params import layer_params, model_params, rank_params
from tests.conftest import make_arch

ROOT = pathlib.Path(__file__).resolve().parents[2]
L70 = published_arch("llama3-70b")
L8 = published_arch("llama3-8b")


def _plan_main():
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def setup(**kw) -> TrainSetup:
    base = dict(layout=ParallelLayout(1, 1), dp=1, precision="bfloat16", optimizer="adam", sgd_momentum=0.0,
                distributed_optimizer=False, recompute=False, reference=True, ref_offload=False, seq_len=128,
                micro_seqs=2, micro_batches=8, gpu_mem_gib=80.0, overhead_gib=0.0)
    return TrainSetup(**{**base, **kw})


# -- parameters --------------------------------------------------------------------------------
def test_published_models_have_their_published_parameter_counts():
    assert model_params(L8) == 8_030_261_248  # Meta-Llama-3-8B
    assert model_params(L70) == 70_553_706_496  # Meta-Llama-3-70B
    assert model_params(published_arch("smollm2-135m")) == 134_515_008


def test_layer_params_by_hand():
    # 70B layer: QKV (64 + 2·8)·128·8192, proj 8192·8192, SwiGLU 3·28672·8192, two norms 2·8192
    assert layer_params(L70) == 80 * 128 * 8192 + 8192 * 8192 + 3 * 28672 * 8192 + 2 * 8192
    assert layer_params(L70, tp=8) == (80 * 128 * 8192 + 8192 * 8192 + 3 * 28672 * 8192) // 8 + 2 * 8192


def test_rank_params_ends_of_the_pipeline():
    lay = ParallelLayout(8, 4)
    mid = 20 * layer_params(L70, 8)
    assert rank_params(L70, lay, 1) == rank_params(L70, lay, 2) == mid
    assert rank_params(L70, lay, 0) == mid + 128256 * 8192 // 8
    assert rank_params(L70, lay, 3) == mid + 128256 * 8192 // 8 + 8192  # output layer + final norm
    tied = make_arch(tie_word_embeddings=True)  # PP = 1: the output layer reuses the embedding
    assert rank_params(tied, ParallelLayout(1, 1), 0) == model_params(tied)


# -- optimizer and static memory ------------------------------------------------------------------
def test_bytes_per_parameter_by_precision_and_optimizer():
    assert optimizer_bytes_per_param("bfloat16", "adam") == 12  # fp32 master + m + v
    assert optimizer_bytes_per_param("float32", "adam") == 8  # no master copy
    assert optimizer_bytes_per_param("bfloat16", "sgd", 0.9) == 8
    assert optimizer_bytes_per_param("float32", "sgd", 0.0) == 0


def test_static_items_by_hand():
    arch = make_arch()
    n = rank_params(arch, ParallelLayout(1, 1), 0)
    st = estimate(arch, setup()).stages[0]
    assert (st.items["weights"], st.items["gradients"], st.items["optimizer"]) == (2 * n, 4 * n, 12 * n)
    assert st.items["reference"] == 2 * n  # the 18 bytes/param of mixed-precision Adam, plus the reference
    st = estimate(arch, setup(distributed_optimizer=True, dp=4)).stages[0]
    assert st.items["optimizer"] == 12 * n / 4  # master + moments sharded over DP
    st = estimate(arch, setup(precision="float32")).stages[0]
    assert (st.items["weights"], st.items["gradients"], st.items["optimizer"]) == (4 * n, 4 * n, 8 * n)


def test_phases_reference_offload_and_colocated_engine():
    arch = make_arch()
    on = estimate(arch, setup(engine_fraction=0.5)).stages[0]
    off = estimate(arch, setup(engine_fraction=0.5, ref_offload=True)).stages[0]
    ref = on.items["weights"]  # same dtype as the actor
    assert on.phases["train"] - off.phases["train"] == ref  # offloaded: not on the device while training
    assert on.phases["reference"] == off.phases["reference"]  # ... but it visits for the reference pass
    assert on.items["rollout_engine"] == 0.5 * 80 * GIB
    static = on.items["weights"] + on.items["gradients"] + on.items["optimizer"]
    assert on.phases["rollout"] == static + ref + 0.5 * 80 * GIB  # no activations while generating
    assert "rollout" not in estimate(arch, setup()).stages[0].phases  # disaggregated / embedded
    assert "reference" not in estimate(arch, setup(reference=False)).stages[0].phases  # SimPO


# -- activations: Korthikanti et al. 2022 -----------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("s,b", [(2048, 1), (4096, 2)])
def test_paper_mode_is_the_papers_closed_form(tp, s, b):
    """Per layer, no SP: s·b·h·(10 + 24/t + 5·a·s/(h·t)); t = 1: s·b·h·(34 + 5·a·s/h)."""
    h, a = L70.hidden_size, L70.num_attention_heads
    got = act.layer_bytes(L70, s, b, tp, act.PAPER)
    assert got == pytest.approx(s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp)), rel=1e-12)
    if tp == 1:
        assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h), rel=1e-12)


def test_paper_mode_70b_first_stage_for_its_layout():
    """The 70B dims at TP8 × PP4, s = 2048, 2 sequences: the first stage holds PP micro-batches of
    L/PP layers = L layers' worth (1F1B); interleaved v: L·(1 + (p − 1)/(p·v)); recompute: 2sbh·L."""
    s, b, t, p, L = 2048, 2, 8, 4, 80
    h, a = 8192, 64
    per_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    first = act.stage_activations(L70, s=s, b=b, tp=t, pp=p, vpp=1, stage=0, micro_batches=64, recompute=False,
                                  model=act.PAPER)
    assert first.stored == pytest.approx(L * per_layer, rel=1e-12)
    assert first.output == 0.0  # logits live on the last stage
    inter = act.stage_activations(L70, s=s, b=b, tp=t, pp=p, vpp=5, stage=0, micro_batches=64, recompute=False,
                                  model=act.PAPER)
    assert inter.stored == pytest.approx(L * (1 + (p - 1) / (p * 5)) * per_layer, rel=1e-12)
    rec = act.stage_activations(L70, s=s, b=b, tp=t, pp=p, vpp=1, stage=0, micro_batches=64, recompute=True,
                                model=act.PAPER)
    assert rec.stored == 2 * s * b * h * L and rec.working == pytest.approx(per_layer, rel=1e-12)
    last = act.stage_activations(L70, s=s, b=b, tp=t, pp=p, vpp=1, stage=3, micro_batches=64, recompute=False,
                                 model=act.PAPER)
    assert last.stored == pytest.approx(L / p * per_layer, rel=1e-12)  # one micro-batch in flight
    assert last.output == 2 * 2 * s * b * h + 4 * s * b * 128256 / t


def test_llama_mode_70b_by_hand():
    """GQA + SwiGLU + flash attention, no dropout: s·b·(8h + (4q + 4g·d + 6f + 4a)/t) bytes.
    70B, s = 2048, b = 2, t = 8: 8·8192 + (4·8192 + 4·1024 + 6·28672 + 4·64)/8 = 65536 + 26144."""
    assert act.layer_bytes(L70, 2048, 2, 8) == 2048 * 2 * (65536 + 26144) == 375_521_280


def test_gqa_and_swiglu_terms_against_the_paper():
    """An MHA, 4h, unfused, dropout-free model is the paper minus dropout: the masks after the
    projection and fc2 (2sbh), the attention-probability mask and dropout output (as²b + 2as²b);
    SwiGLU saves 3f per token where GELU saves 2f; flash attention with GQA saves K, V at g·d."""
    h, s, b = 64, 32, 2
    gpt = make_arch(num_kv_heads=8, ffn_hidden_size=4 * h)
    unfused = act.ActivationModel("x", gated_mlp=False, flash_attention=False, dropout=False, paper_dims=False)
    a = gpt.num_attention_heads
    paper = act.layer_bytes(gpt, s, b, 1, act.PAPER)
    assert act.layer_bytes(gpt, s, b, 1, unfused) == paper - 2 * s * b * h - 3 * a * s * s * b
    swiglu = dataclasses.replace(unfused, gated_mlp=True)  # 3f saved per token vs GELU's 2f: f = 96 ~ f = 144
    assert act.layer_bytes(make_arch(num_kv_heads=8, ffn_hidden_size=96), s, b, 1, swiglu) == \
        act.layer_bytes(make_arch(num_kv_heads=8, ffn_hidden_size=144), s, b, 1, unfused)
    # flash with GQA: K and V at g·d instead of a·d (g = 4 of 8 heads: 2·2·s·b·(a − g)·d less)
    gqa, mha = make_arch(), make_arch(num_kv_heads=8)
    d = gqa.head_dim
    assert act.layer_bytes(mha, s, b, 1) - act.layer_bytes(gqa, s, b, 1) == 2 * 2 * s * b * 4 * d


def test_in_flight_micro_batches_per_stage():
    assert [act.in_flight_layers(80, 4, 1, i, 64) for i in range(4)] == [80, 60, 40, 20]
    assert act.in_flight_layers(80, 4, 1, 0, 2) == 40  # fewer micro-batches than stages
    assert act.in_flight_layers(80, 1, 1, 0, 64) == 80  # no pipeline: one at a time
    # interleaved: 2(p−i−1) + (v−1)p + 1 chunk micro-batches of L/(p·v) layers
    assert act.in_flight_layers(80, 4, 2, 0, 64) == (6 + 4 + 1) * 10
    assert act.in_flight_layers(80, 4, 2, 3, 64) == (0 + 4 + 1) * 10


# -- FLOPs ------------------------------------------------------------------------------------------
def test_forward_flops_per_token_by_hand():
    matmul = 32 * (48 * 128 * 4096 + 4096 * 4096 + 3 * 14336 * 4096) + 4096 * 128256
    assert fl.matmul_params_per_token(L8) == matmul == 7_504_658_432
    assert fl.forward_flops_per_token(L8, 2048) == 2 * matmul + 4 * 32 * 32 * 128 * 2048 == 16_083_058_688


def test_train_step_flops_multiples_of_the_forward():
    f = fl.forward_flops_per_token(L70, 2048)
    assert fl.train_step_flops(L70, 1000, 2048, recompute=False, reference=False) == 3 * 1000 * f
    assert fl.train_step_flops(L70, 1000, 2048, recompute=True, reference=False) == 4 * 1000 * f
    assert fl.train_step_flops(L70, 1000, 2048, recompute=True, reference=True) == 5 * 1000 * f


def test_generation_flops_by_hand():
    arch = make_arch()  # 8 layers, 8 heads of 8
    P, R, n = 4, 3, 2
    prefill = P * fl.forward_flops_per_token(arch, P)
    keys = sum(P + j + 1 for j in range(R))  # token j attends to the prompt and j + 1 tokens
    decode = n * (R * 2 * fl.matmul_params_per_token(arch) + 4 * 8 * 8 * 8 * keys)
    assert fl.generation_flops(arch, 1, P, R, n) == pytest.approx(prefill + decode, rel=1e-12)
    assert fl.generation_flops(arch, 1, P, R, n, shared_prefix=False) == pytest.approx(2 * prefill + decode, rel=1e-12)


# -- composition: placeholders for run-only mandatory keys -------------------------------------------
def test_placeholders_fill_only_run_only_keys():
    from megatron_spin.errors import ConfigError
    from megatron_spin.plan.preset import compose_preset

    _, filled = compose_preset("spin_trainer")
    assert filled == ()  # the CPU preset has its packaged model and prompts
    cfg, filled = compose_preset("spin_trainer", ("data.train_files=[]", "actor_rollout_ref.model.path=???"))
    assert filled == ("actor_rollout_ref.model.path", "data.train_files") and cfg.data.train_files
    _, filled = compose_preset("spin_trainer", ("reward_model.type=hf",))  # the reward model's path
    assert filled == ("reward_model.path",)
    with pytest.raises(ConfigError, match=r"trainer\.experiment_name: mandatory in preset 'spin_trainer'"):
        compose_preset("spin_trainer", ("trainer.experiment_name=???",))


# -- the CLI on the real presets ----------------------------------------------------------------------
def test_cli_spin_70b_on_80gb_prints_a_fitting_layout():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--preset", "spin_70b",
                          "--gpu-mem-gb", "80"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "model llama3-70b" in text and "valid (load_run_config, Placement.plan, validate_layout)" in text
    assert "Layouts that fit, best first" in text, text
    first_row = text.split("Layouts that fit")[1].splitlines()[2]
    assert first_row.split()[0] == "1" and "TP" in first_row, text


@pytest.mark.parametrize("preset", ["spin_70b", "spin_8b"])
def test_cli_json_numbers_are_consistent(preset, capsys):
    assert _plan_main()(["--preset", preset, "--gpu-mem-gb", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    req = plan["requested"]
    assert plan["model"].startswith({"spin_70b": "llama3-70b", "spin_8b": "llama3-8b"}[preset])
    for st in req["stages"]:
        assert st["phases_gib"]["train"] == pytest.approx(
            sum(v for k, v in st["items_gib"].items() if k != "rollout_engine"), rel=1e-9)
    assert len(plan["candidates"]) == min(10, plan["num_fitting"]) >= 1
    assert all(c["fits"] and c["peak_gib"] <= 80 for c in plan["candidates"])
    assert plan["flops"]["actor_train_flops"] > 0 and plan["placeholders"] is not None


@pytest.mark.parametrize("args,rule", [
    (["--nodes", "1", "--gpus-per-node", "8", "actor_rollout_ref.actor.tp=8", "actor_rollout_ref.actor.pp=3"],
     "rule trainer GPUs % (TP*PP) == 0 violated"),
    (["--nodes", "4", "--gpus-per-node", "6", "actor_rollout_ref.actor.tp=3", "actor_rollout_ref.actor.pp=1"],
     "rule num_attention_heads % TP == 0 violated"),
    (["--nodes", "4", "--gpus-per-node", "4", "actor_rollout_ref.actor.tp=8", "actor_rollout_ref.actor.pp=1"],
     "rule n_gpus_per_node % TP == 0 violated"),
    (["--nodes", "3", "--gpus-per-node", "8", "actor_rollout_ref.actor.tp=1", "actor_rollout_ref.actor.pp=3"],
     "rule num_layers % PP == 0 violated"),
    (["actor_rollout_ref.actor.precision=fp8"], "actor_rollout_ref.actor.precision"),
    (["actor_rollout_ref.rollout.top_p=2"], "actor_rollout_ref.rollout.top_p"),
])
def test_cli_invalid_layout_exits_non_zero_naming_the_rule(args, rule, capsys):
    colocate = ["actor_rollout_ref.rollout.placement=colocated", "actor_rollout_ref.rollout.tp_size=1",
                "actor_rollout_ref.actor.vpp=null"]
    assert _plan_main()(["--preset", "spin_70b", *colocate, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid: ") and rule in err, err


def test_cli_unknown_preset_and_model(capsys):
    assert _plan_main()(["--preset", "spin_nope"]) == 2
    assert "spin_nope" in capsys.readouterr().err
    assert _plan_main()(["--preset", "spin_trainer", "--model", "llama9-1t"]) == 2
    assert "llama9-1t" in capsys.readouterr().err


def test_cli_hf_config_and_require_fit(tmp_path, capsys):
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, hidden_act="silu")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _plan_main()(["--model", str(tmp_path / "config.json"), "--gpus-per-node", "2", "--require-fit"]) == 0
    text = capsys.readouterr().out
    assert "FITS" in text and "4 layers, hidden 64" in text
    assert _plan_main()(["--model", str(tmp_path), "--gpus-per-node", "2", "--gpu-mem-gb", "1",
                         "--require-fit"]) == 3
