"""The layout planner: will a run fit, and which TP × PP (× EP for MoE) × optimizer × recompute layout is best.

    inp = load_plan_input(PlanRequest(preset="spin_70b", gpu_mem_gib=80))   # the trainer's start-up rules
    cand = requested(inp)                      # memory per GPU by item and phase, step-time proxy
    best = enumerate_candidates(inp)[0]

``models`` (published HF configs), ``params`` (exact per-rank parameter counts, experts
included), ``activations`` (Korthikanti et al. 2022, adjusted for GQA, SwiGLU and top-k
routing), ``memory`` (items and phases per GPU), ``flops`` (model FLOPs; also used by the
trainer for MFU), ``preset`` (Hydra composition and validation), ``search`` (enumerate and
rank), ``report`` (tables and JSON).  The CLI is ``tools/plan.py``.
"""
