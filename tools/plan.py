"""Plan a run's parallel layout: does it fit, and which layouts would.

For a preset (Hydra config in ``megatron_spin/config/conf``) or an HF config, and a cluster
shape (nodes, GPUs per node, GPU memory), this

1. validates the preset's layout with the trainer's own start-up rules (``load_run_config``,
   ``Placement.plan``, ``validate_layout``) and exits 2 naming the key or rule when it is
   invalid;
2. estimates per-GPU memory item by item — weights, fp32 gradients, optimizer states (with
   or without the distributed optimizer), activations (Korthikanti et al. 2022, adjusted
   for GQA and SwiGLU, with the pipeline schedule's in-flight micro-batches and optional
   full recompute), the reference model (on device or offloaded), a colocated SGLang
   engine's static pool and a fixed overhead — for the train, reference and rollout phases,
   and the step's model FLOPs (training, reference, generation);
3. enumerates TP × PP × EP × distributed optimizer × recompute × reference offload, keeps the
   layouts the trainer accepts, and ranks them by fit, then by a step-time proxy.

Mixture-of-experts models (Qwen3-MoE, e.g. ``--model qwen3-30b-a3b``): EP (expert
parallelism, ``actor_rollout_ref.actor.ep``) splits each layer's experts over EP of the
data-parallel ranks (DP % EP == 0, experts % EP == 0); each rank holds experts/EP experts,
the distributed optimizer shards expert weights over DP/EP ranks only, routed tokens count
top-k times in the activations, and FLOPs count the router and the top-k experts.  The
report shows EP in every layout of a MoE model and its total and active parameters.

    python tools/plan.py --preset spin_70b --gpu-mem-gb 80
    python tools/plan.py --preset spin_8b --nodes 1 --gpus-per-node 8 actor_rollout_ref.actor.tp=4
    python tools/plan.py --preset spin_trainer --model llama3-8b --gpus-per-node 8 --json
    python tools/plan.py --preset spin_8b --model qwen3-30b-a3b --gpu-mem-gb 141
    python tools/plan.py --preset spin_70b --model /models/Llama-3.1-70B/config.json --top 20

Trailing ``key=value`` arguments are Hydra overrides of the preset, as for
``megatron-spin-train``.  Exit status: 0 planned, 2 invalid configuration or layout,
3 with ``--require-fit`` when the requested layout does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides of the preset")
    p.add_argument("--preset", default="spin_trainer", help="config name in megatron_spin/config/conf")
    p.add_argument("--config-dir", default=None, help="compose presets from this directory instead")
    p.add_argument("--model", default=None,
                   help="HF config.json or model directory, or a published name (llama3-8b, llama3-70b, "
                        "smollm2-135m, qwen3-30b-a3b: MoE, EP is searched); default: the preset's model")
    p.add_argument("--nodes", type=int, default=None, help="default: the preset's trainer.nnodes")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the preset's trainer.n_gpus_per_node")
    p.add_argument("--gpu-mem-gb", "--gpu-mem-gib", dest="gpu_mem", type=float, default=80.0,
                   help="memory per GPU in GiB, as GPUs are sold (an '80 GB' H100 holds 80 GiB)")
    p.add_argument("--overhead-gb", "--overhead-gib", dest="overhead", type=float, default=3.0,
                   help="fixed per-GPU allowance in GiB: CUDA context, NCCL/cuBLAS workspaces, fragmentation")
    p.add_argument("--activations", default="megatron-gpu", choices=["megatron-gpu", "paper"],
                   help="activation model: the GPU trainer's kernels (GQA, SwiGLU, flash attention, no dropout) "
                        "or Korthikanti et al.'s GPT (MHA, 4h GELU, unfused attention, dropout)")
    p.add_argument("--top", type=int, default=10, help="fitting layouts to list")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--require-fit", action="store_true", help="exit 3 when the requested layout does not fit")
    args = p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_spin.plan import report
    from megatron_spin.plan.preset import PlanRequest, load_plan_input
    from megatron_spin.plan.search import enumerate_candidates, requested

    req = PlanRequest(preset=args.preset, overrides=tuple(args.overrides), model=args.model, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem, overhead_gib=args.overhead,
                      config_dir=args.config_dir, activations=args.activations)
    try:
        inp = load_plan_input(req)
    except (ValueError, HydraException, OmegaConfBaseException, OSError) as exc:
        # ConfigError / LayoutError / UnsupportedModelError name the key or the rule.
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    cand = requested(inp)
    cands = enumerate_candidates(inp)
    if args.json:
        print(json.dumps(report.plan_dict(inp, args.preset, cand, cands, args.top), indent=2))
    else:
        print(report.plan_text(inp, args.preset, cand, cands, args.top))
    return 3 if args.require_fit and not cand.fits else 0


if __name__ == "__main__":
    sys.exit(main())
