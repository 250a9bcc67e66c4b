"""The plan as text tables (GiB per item, each phase against the GPU) and as JSON-ready data."""

from __future__ import annotations

import dataclasses

from megatron_spin.spec import flops as fl
from megatron_spin.plan.memory import GIB, engine_memory, max_engine_fraction
from megatron_spin.plan.params import active_params, model_params
from megatron_spin.plan.preset import SGLANG_DEFAULT_FRACTION, PlanInput, engine_fraction, pairs_per_step
from megatron_spin.plan.search import ACHIEVED_FLOPS, Candidate

ITEM_LABELS = {
    "weights": "weights",
    "gradients": "gradients (fp32 main grads)",
    "optimizer": "optimizer (master + states)",
    "activations": "activations (stored)",
    "recompute_working": "recompute working layer",
    "moe_dispatch": "MoE dispatch buffers",
    "reference": "reference weights",
    "overhead": "fixed overhead",
    "rollout_engine": "rollout engine (SGLang static)",
}


def _gb(x: float | None) -> str:
    return f"{'-':>8s}" if x is None else f"{x / GIB:8.2f}"


def _flags(c: Candidate) -> str:
    s = c.setup
    return " ".join(f for f, on in (("distopt", s.distributed_optimizer), ("recompute", s.recompute),
                                    ("ref-offload", s.reference and s.ref_offload)) if on) or "-"


def _layout(c: Candidate, moe: bool = False) -> str:
    """``TP2 PP2 DP2``; a mixture-of-experts model also shows its EP (its experts over EP of the DP ranks)."""
    lay = c.setup.layout
    return (f"TP{lay.tp} PP{lay.pp}" + (f" VPP{lay.vpp}" if lay.chunks_per_rank > 1 else "")
            + (f" EP{lay.ep}" if moe else "") + f" DP{c.setup.dp}")


def _model_line(a) -> str:
    if a.is_moe:
        mlp = (f"MoE {a.num_experts} SwiGLU experts of {a.moe_ffn_hidden_size}, top-{a.moe_top_k}"
               + (" (renormalised)" if a.moe_norm_topk_prob else ""))
        size = f"{model_params(a) / 1e9:.2f} B parameters ({active_params(a) / 1e9:.2f} B active per token)"
    else:
        mlp, size = f"SwiGLU FFN {a.ffn_hidden_size}", f"{model_params(a) / 1e9:.2f} B parameters"
    return (f"  model    {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads / "
            f"{a.num_kv_heads} KV heads of {a.head_dim}, {mlp}, vocab {a.vocab_size}, "
            f"{'tied' if a.tie_word_embeddings else 'untied'}: {size}")


def header(inp: PlanInput, preset: str) -> list[str]:
    a, run, p = inp.arch, inp.run, inp.placement
    r, d = run.rollout, run.data
    gpn = run.trainer.n_gpus_per_node
    total = run.trainer.nnodes * gpn
    lines = [
        f"megatron_spin layout plan: preset {preset}, model {inp.model_source}",
        _model_line(a),
        f"  cluster  {run.trainer.nnodes} node(s) x {gpn} GPU(s) x {inp.gpu_mem_gib:g} GiB = {total} GPUs; "
        f"{p.trainer_world} train, rollout {r.engine} {r.placement}: {p.engines} engine(s) x TP{r.tp_size}"
        + (f", mem_fraction_static {engine_fraction(run):.2f}" if engine_fraction(run) is not None else ""),
        f"  step     {d.train_batch_size} prompts x n={r.n} -> up to {pairs_per_step(run)} pairs; sequences "
        f"{d.max_prompt_length}+{d.max_response_length} tokens; micro-batch {run.actor.micro_pairs} pair(s) = "
        f"{2 * run.actor.micro_pairs} sequences",
    ]
    if inp.placeholders:
        lines.append(f"  filled   {', '.join(inp.placeholders)} (mandatory in the preset; not read by the planner)")
    lines += [f"  note     {n}" for n in inp.notes]
    return lines


def requested_table(inp: PlanInput, c: Candidate) -> list[str]:
    s, est = c.setup, c.memory
    shown = [est.stages[0]] + ([est.stages[-1]] if len(est.stages) > 1 else [])
    lines = [
        "",
        f"Requested layout {_layout(c, inp.arch.is_moe)} on {c.world} trainer GPUs: valid (load_run_config, "
        f"Placement.plan, validate_layout)",
        f"  {s.precision}, {s.optimizer}, {_flags(c)}; M = {s.micro_batches} micro-batches per DP rank per step; "
        f"activation model {s.activation_model.name}",
        "",
        f"  {'per GPU [GiB]':32s}" + "".join(f"{'stage ' + str(st.stage):>10s}" for st in shown),
        f"  {'parameters [M]':32s}" + "".join(f"{st.params / 1e6:10.1f}" for st in shown),
    ]
    if inp.arch.is_moe:  # sharded over expert-DP (DP/EP) by the distributed optimizer, the rest over DP
        lines.append(f"  {'  of which experts [M]':32s}" + "".join(f"{st.expert_params / 1e6:10.1f}" for st in shown))
    for key, label in ITEM_LABELS.items():
        if key in shown[0].items:
            lines.append(f"  {label:32s}" + "".join(f"  {_gb(st.items[key])}" for st in shown))
    lines.append(f"  {'-' * 32}" + "-" * 10 * len(shown))
    for phase in shown[0].phases:
        lines.append(f"  {'phase ' + phase:32s}" + "".join(f"  {_gb(st.phases[phase])}" for st in shown))
    lines.append(f"  {'GPU memory':32s}" + f"  {_gb(est.gpu_bytes)}" * len(shown))
    worst = est.worst
    phase = max(worst.phases, key=worst.phases.get)
    verdict = "FITS" if est.fits else "DOES NOT FIT"
    lines.append(f"  => {verdict}: peak {worst.peak / GIB:.2f} GiB ({phase} phase, stage {worst.stage}) of "
                 f"{est.gpu_bytes / GIB:g} GiB")
    if s.engine_fraction is not None:
        lines.append(f"  => largest colocated mem_fraction_static the trainer leaves room for: "
                     f"{max_engine_fraction(est):.2f} (set: {s.engine_fraction:.2f})")
    lines += [f"  !! {p}" for p in c.problems]
    return lines


def flops_summary(inp: PlanInput, c: Candidate) -> dict:
    s, run = c.setup, inp.run
    tokens = s.micro_batches * s.micro_seqs * s.seq_len * s.dp
    train = fl.train_step_flops(inp.arch, tokens, s.seq_len, recompute=False, reference=False)
    recompute = tokens * fl.forward_flops_per_token(inp.arch, s.seq_len) if s.recompute else 0.0
    ref = tokens * fl.forward_flops_per_token(inp.arch, s.seq_len) if s.reference else 0.0
    gen = fl.generation_flops(inp.arch, run.data.train_batch_size, run.data.max_prompt_length,
                              run.data.max_response_length, run.rollout.n)
    return {"tokens_trained": tokens, "forward_flops_per_token": fl.forward_flops_per_token(inp.arch, s.seq_len),
            "actor_train_flops": train, "recompute_flops": recompute, "reference_flops": ref, "generation_flops": gen,
            "train_seconds_at_assumed_throughput": (train + recompute + ref) / c.world / ACHIEVED_FLOPS}


def flops_lines(f: dict) -> list[str]:
    return [
        "",
        f"FLOPs per step (model FLOPs; forward {f['forward_flops_per_token'] / 1e9:.1f} GFLOP per token "
        "at full length)",
        f"  actor forward+backward   {f['actor_train_flops'] / 1e15:10.1f} PFLOP  ({f['tokens_trained']} tokens)",
        f"  recompute forward        {f['recompute_flops'] / 1e15:10.1f} PFLOP  (hardware FLOPs, not in MFU)",
        f"  reference forward        {f['reference_flops'] / 1e15:10.1f} PFLOP",
        f"  generation (n samples)   {f['generation_flops'] / 1e15:10.1f} PFLOP",
        f"  train + recompute + reference at {ACHIEVED_FLOPS / 1e12:.0f} TFLOP/s per GPU: "
        f"{f['train_seconds_at_assumed_throughput']:.1f} s",
    ]


def engine_summary(inp: PlanInput) -> dict | None:
    run = inp.run
    r = run.rollout
    if r.engine != "sglang" or run.trainer.n_gpus_per_node == 0:
        return None
    frac = r.mem_fraction_static if r.mem_fraction_static is not None else SGLANG_DEFAULT_FRACTION
    e = engine_memory(inp.arch, engine_tp=r.tp_size, fraction=frac, gpu_mem_gib=inp.gpu_mem_gib,
                      prompts=run.data.train_batch_size, n=r.n, engines=inp.placement.engines,
                      seq_len=run.data.max_prompt_length + run.data.max_response_length)
    return dataclasses.asdict(e) | {"fraction": frac}


def engine_lines(e: dict | None) -> list[str]:
    if e is None:
        return []
    return [
        "",
        f"Rollout engine GPU (SGLang, mem_fraction_static {e['fraction']:.2f}): weights "
        f"{e['weights'] / GIB:.2f} GiB of a {e['static_pool'] / GIB:.2f} GiB static pool -> KV cache for "
        f"{e['kv_tokens']} tokens ({e['kv_bytes_per_token'] / 1e3:.0f} kB each); one step's samples at full "
        f"length need {e['tokens_needed']}"
        + ("" if e["kv_tokens"] >= e["tokens_needed"] else " (SGLang will queue requests)"),
    ] + (["  !! the engine's weights do not fit its static pool: raise mem_fraction_static or rollout.tp_size"]
         if e["weights"] >= e["static_pool"] else [])


def candidates_table(cands: list[Candidate], top: int, moe: bool = False) -> list[str]:
    fitting = [c for c in cands if c.fits]
    colocated = any(c.setup.engine_fraction is not None for c in cands)
    if fitting:
        title = (f"Layouts that fit, best first ({len(fitting)} of {len(cands)} accepted layout variants fit; "
                 f"showing {min(top, len(fitting))})")
        shown = fitting[:top]
    else:
        title = (f"No layout fits ({len(cands)} accepted layout variants); the {min(top, len(cands))} closest, "
                 f"smallest peak first")
        shown = sorted((c for c in cands if not c.problems), key=lambda c: c.memory.worst.peak)[:top]
    lines = ["", title + "; GiB per GPU: items of the stage with the largest train phase, phases: the largest over "
                 "stages" + ("; max_frac: largest colocated mem_fraction_static "
                                                       "the trainer leaves room for" if colocated else "")]
    lw = 23 if moe else 18  # room for "TP1 PP2 VPP2 EP16 DP16"
    lines.append(f"  {'#':>2s} {'layout':{lw}s} {'flags':28s} {'weights':>8s} {'grads':>8s} {'optim':>8s} "
                 f"{'activ':>8s} {'ref':>8s} {'engine':>8s} | {'train':>8s} {'refpass':>8s} {'rollout':>8s} | "
                 f"{'peak':>8s} {'step_s':>7s}" + (f" {'max_frac':>8s}" if colocated else ""))
    for i, c in enumerate(shown, 1):
        w = max(c.memory.stages, key=lambda st: st.phases["train"])
        it, ph = w.items, c.memory.phase_peaks
        lines.append(
            f"  {i:2d} {_layout(c, moe):{lw}s} {_flags(c):28s} {_gb(it['weights'])} {_gb(it['gradients'])} "
            f"{_gb(it['optimizer'])} {_gb(it['activations'] + it['recompute_working'] + it.get('moe_dispatch', 0.0))} "
            f"{_gb(it['reference'])} "
            f"{_gb(it.get('rollout_engine'))} | {_gb(ph['train'])} {_gb(ph.get('reference'))} "
            f"{_gb(ph.get('rollout'))} | {_gb(c.memory.worst.peak)} {c.step_s:7.1f}"
            + (f" {max_engine_fraction(c.memory):8.2f}" if colocated else ""))
    if not fitting:
        lines.append("  => none fits: more or larger GPUs, shorter sequences, fewer pairs per micro-batch"
                     + (", or a smaller mem_fraction_static (see max_frac)" if colocated else ""))
    return lines


def candidate_dict(c: Candidate) -> dict:
    s = c.setup
    return {
        "tp": s.layout.tp, "pp": s.layout.pp, "vpp": s.layout.vpp, "ep": s.layout.ep, "dp": s.dp,
        "trainer_gpus": c.world,
        "distributed_optimizer": s.distributed_optimizer, "recompute": s.recompute,
        "ref_offload": s.ref_offload, "reference": s.reference, "micro_batches": s.micro_batches,
        "fits": c.fits, "step_time_proxy_s": c.step_s, "problems": list(c.problems),
        "peak_gib": c.memory.worst.peak / GIB, "phase_peaks_gib": {k: v / GIB for k, v in c.memory.phase_peaks.items()},
        "stages": [{"stage": st.stage, "params": st.params, "expert_params": st.expert_params,
                    "items_gib": {k: v / GIB for k, v in st.items.items()},
                    "phases_gib": {k: v / GIB for k, v in st.phases.items()}} for st in c.memory.stages],
    }


def plan_dict(inp: PlanInput, preset: str, req: Candidate, cands: list[Candidate], top: int) -> dict:
    out = {
        "preset": preset, "model": inp.model_source, "arch": dataclasses.asdict(inp.arch),
        "model_params": model_params(inp.arch), "active_params": active_params(inp.arch),
        "gpu_mem_gib": inp.gpu_mem_gib, "overhead_gib": inp.overhead_gib,
        "placement": dataclasses.asdict(inp.placement), "placeholders": list(inp.placeholders),
        "notes": list(inp.notes), "requested": candidate_dict(req), "flops": flops_summary(inp, req),
        "engine": engine_summary(inp),
        "candidates": [candidate_dict(c) for c in cands if c.fits][:top],
        "num_candidates": len(cands), "num_fitting": sum(c.fits for c in cands),
    }
    if req.setup.engine_fraction is not None:
        out["max_engine_fraction"] = max_engine_fraction(req.memory)
    return out


def plan_text(inp: PlanInput, preset: str, req: Candidate, cands: list[Candidate], top: int) -> str:
    lines = header(inp, preset) + requested_table(inp, req) + flops_lines(flops_summary(inp, req))
    lines += engine_lines(engine_summary(inp)) + candidates_table(cands, top, inp.arch.is_moe)
    return "\n".join(lines)
