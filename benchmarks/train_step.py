"""Benchmark one Online-DPO actor update and one reference log-prob pass on SmolLM2-135M.

Computes, in one launch on the same machine (every figure comes from the same rank processes):
  * the fp32 matmul rate: ``torch.matmul`` of square fp32 matrices (1024, 2048), run by every
    rank at once with the rank's own thread count (``launch`` gives each rank
    ``cpu_count // world_size`` threads, at least 1), best of 3; the GFLOP/s figure is the sum
    over ranks (2·n³ per product), i.e. what this machine delivers to this layout;
  * the actor update: ``--pairs`` random-token pairs (prompt ``seq_len // 4`` tokens, chosen and
    rejected responses of ``seq_len - prompt`` tokens, so every row is exactly ``--seq-len`` long and
    nothing is padding), ``actor.train_step`` (Adam, DPO sigmoid loss) run ``--steps`` times after
    one untimed warm-up step; seconds per step (mean and best) and achieved FLOP/s;
  * one reference pass: ``ref.logps`` over the same micro-batches (one untimed pass first, which
    also supplies the reference log-probs the update needs), ``--steps`` timed passes.

FLOP model (the PaLM/Megatron "6N + attention" estimate; T = 2·pairs·S tokens, all rows counted):
    N      = matmul parameters: per layer Q,K,V,O projections + gated MLP (3·hidden·ffn), plus the
             LM head (vocab·hidden); the input-embedding lookup and norms do no matmul work
    update = 6·N·T + 12·L·d·S²·(2·pairs)    (fwd + bwd; d = heads·head_dim, = hidden for SmolLM2)
    ref    = 2·N·T +  4·L·d·S²·(2·pairs)    (fwd only)
The attention term counts the full S×S score matrix (no causal halving), as PaLM's MFU does.
"MFU" below = achieved FLOP/s / measured matmul rate (not a vendor peak).

    PYTHONPATH=. python benchmarks/train_step.py [--pairs 4] [--micro-pairs 1] [--seq-len 256]
        [--steps 3] [--tp 1 --pp 1] [--workdir W] [--json OUT]

The converted Megatron checkpoint is cached in ``--workdir`` (default: next to the embedded HF
model) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout


def matmul_rate(sizes=(1024, 2048), trials=3) -> dict:
    """Aggregate fp32 matmul GFLOP/s of all ranks running at once (call on every rank)."""
    import torch
    import torch.distributed as dist

    world, best = dist.get_world_size(), {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        reps = max(2, int(4e9 // (2 * n**3)))  # ~4 GFLOP per rank per trial: long enough to time
        torch.matmul(a, b)  # warm-up: thread pool start, first-touch of the output
        for _ in range(trials):
            dist.barrier()  # all ranks start together: they share the cores as in training
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            dist.barrier()  # the slowest rank decides the wall time
            rate = world * reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9
            best[n] = max(best.get(n, 0.0), rate)
    return {"gflops_by_size": best, "gflops": max(best.values())}


def timed(fn, barrier):
    barrier()  # every rank enters together, and the step ends when the last rank finishes
    t0 = time.perf_counter()
    out = fn()
    barrier()
    return time.perf_counter() - t0, out


def _bench_rank(rank, world_size, ckpt, layout, batch, micro_pairs, steps):
    import torch
    import torch.distributed as dist

    from megatron_spin.ckpt.streaming import read_arch
    from megatron_spin.config.algorithm import LossConfig
    from megatron_spin.config.optim import BatchConfig, OptimConfig
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    mm = matmul_rate()  # before the models exist: nothing else in memory or on the cores
    arch = read_arch(ckpt)
    pctx = init_parallel(layout)
    dist.barrier()
    t0 = time.perf_counter()
    actor = Actor.build(arch, pctx, OptimConfig(optimizer="adam", lr=1e-6), LossConfig(), init_from=ckpt)
    ref = Reference.build(arch, pctx, init_from=ckpt)
    dist.barrier()
    t_build = time.perf_counter() - t0
    mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, micro_pairs), pctx.dp_rank, pctx.dp_size)
    t_ref_warm, ref_logps = timed(lambda: ref.logps(mbs), dist.barrier)
    ref_times = [timed(lambda: ref.logps(mbs), dist.barrier)[0] for _ in range(steps)]
    t_warm, _ = timed(lambda: actor.train_step(mbs, ref_logps), dist.barrier)
    step_times, metrics = [], None
    for _ in range(steps):
        dt, metrics = timed(lambda: actor.train_step(mbs, ref_logps), dist.barrier)
        step_times.append(dt)
    mm_after = matmul_rate()  # again: a drop means something else took the cores meanwhile
    return {"rank": rank, "threads": torch.get_num_threads(), "matmul": mm, "matmul_after": mm_after,
            "build_s": t_build,
            "ref_warmup_s": t_ref_warm, "ref_s": ref_times, "warmup_step_s": t_warm, "step_s": step_times,
            "metrics": metrics, "last_stage": pctx.is_last_stage, "micro_batches": len(mbs)}


def flop_model(arch, pairs: int, seq: int) -> dict:
    h, d = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    per_layer = h * d + 2 * h * kv + d * h + 3 * h * arch.ffn_hidden_size  # Q, K, V, O, gate+up+down
    n = arch.num_layers * per_layer + arch.vocab_size * h  # + LM head
    rows, tokens = 2 * pairs, 2 * pairs * seq
    attn_fwd = 4 * arch.num_layers * d * seq**2 * rows
    return {"n_matmul_params": n, "tokens": tokens, "update_flops": 6 * n * tokens + 3 * attn_fwd,
            "ref_flops": 2 * n * tokens + attn_fwd}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per update (global batch)")
    p.add_argument("--micro-pairs", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--seq-len", type=int, default=256, help="prompt + response tokens per row")
    p.add_argument("--steps", type=int, default=3, help="timed updates (after one warm-up update)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="where the converted checkpoint is cached")
    p.add_argument("--timeout", type=float, default=3600, help="deadline of the benchmark launch (s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()

    import torch

    from megatron_spin.ckpt.streaming import read_arch
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.models.embedded import DEFAULT_EMBEDDED_DIR, materialize_embedded_model
    from megatron_spin.pairs import PreferencePair, collate_pairs
    from megatron_spin.parallel.launch import launch
    from megatron_spin.parallel.layout import ParallelLayout, validate_layout

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    hf = materialize_embedded_model(DEFAULT_EMBEDDED_DIR)
    ckpt = (a.workdir or DEFAULT_EMBEDDED_DIR.parent) / "smollm2-135m-instruct-megatron"
    if not (ckpt / "metadata.json").exists():  # conversion publishes atomically: present means complete
        convert_hf_to_megatron(hf, ckpt, log=lambda m: print(f"  {m}", file=sys.stderr))
    arch, layout = read_arch(ckpt), ParallelLayout(a.tp, a.pp)
    validate_layout(arch, layout, a.tp * a.pp)  # fails in a second, naming the rule, rather than in a rank
    setup_s = time.perf_counter() - started

    prompt = max(1, a.seq_len // 4)
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(0, arch.vocab_size, (k,), generator=g).tolist()  # noqa: E731
    pairs = [PreferencePair(f"bench-{i}", rand(prompt), rand(a.seq_len - prompt), rand(a.seq_len - prompt),
                            1.0, 0.0, None) for i in range(a.pairs)]
    batch = collate_pairs(pairs, pad_id=0)  # [2P, seq_len], no padding
    world = a.tp * a.pp
    t0 = time.perf_counter()
    ranks = launch(_bench_rank, world, (str(ckpt), layout, batch, a.micro_pairs, a.steps), timeout=a.timeout)
    launch_s = time.perf_counter() - t0
    r0 = ranks[0]
    last = next(r for r in ranks if r["last_stage"])  # loss metrics live on the last pipeline stage
    fm = flop_model(arch, a.pairs, batch.tokens.shape[1])
    step_mean = sum(r0["step_s"]) / len(r0["step_s"])
    ref_mean = sum(r0["ref_s"]) / len(r0["ref_s"])
    mm = r0["matmul"]["gflops"] * 1e9
    fig = {
        "model": "SmolLM2-135M-Instruct", "layout": {"tp": a.tp, "pp": a.pp, "dp": 1, "world": world},
        "threads_per_rank": r0["threads"], "cpu_count": os.cpu_count(), "pairs": a.pairs,
        "micro_pairs": a.micro_pairs, "micro_batches": r0["micro_batches"], "seq_len": batch.tokens.shape[1],
        "flop_model": fm, "flop_formula": {"update": "6*N*T + 12*L*d*S^2*(2*pairs)",
                                           "ref": "2*N*T + 4*L*d*S^2*(2*pairs)"},
        "matmul_gflops": r0["matmul"]["gflops"], "matmul_gflops_by_size": r0["matmul"]["gflops_by_size"],
        "matmul_gflops_after": r0["matmul_after"]["gflops"],
        # Other processes on the machine skew every figure: the 1-minute load average shows them.
        "loadavg_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "update": {"warmup_s": r0["warmup_step_s"], "step_s": r0["step_s"], "mean_s": step_mean,
                   "best_s": min(r0["step_s"]), "gflops": fm["update_flops"] / step_mean / 1e9,
                   "mfu_vs_matmul": fm["update_flops"] / step_mean / mm, "metrics": last["metrics"]},
        "ref": {"warmup_s": r0["ref_warmup_s"], "pass_s": r0["ref_s"], "mean_s": ref_mean,
                "best_s": min(r0["ref_s"]), "gflops": fm["ref_flops"] / ref_mean / 1e9,
                "mfu_vs_matmul": fm["ref_flops"] / ref_mean / mm, "vs_update": ref_mean / step_mean},
        "build_s": r0["build_s"], "setup_s": setup_s, "launch_s": launch_s,
        "total_s": time.perf_counter() - started,
    }
    print_table(fig)
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2))
    return 0


def print_table(f: dict) -> None:
    fm, u, r = f["flop_model"], f["update"], f["ref"]
    lay = f["layout"]
    print(f"\nSmolLM2-135M, TP={lay['tp']} PP={lay['pp']} ({lay['world']} ranks x {f['threads_per_rank']} threads, "
          f"{f['cpu_count']} CPUs); {f['pairs']} pairs x 2 rows x {f['seq_len']} tokens = {fm['tokens']} tokens, "
          f"{f['micro_batches']} micro-batches of {f['micro_pairs']} pair(s); "
          f"N = {fm['n_matmul_params'] / 1e6:.1f} M matmul params")
    print(f"FLOPs: update = 6*N*T + 12*L*d*S^2*rows = {fm['update_flops'] / 1e12:.3f} TFLOP; "
          f"ref = 2*N*T + 4*L*d*S^2*rows = {fm['ref_flops'] / 1e12:.3f} TFLOP\n")
    sizes = ", ".join(f"{n}: {g:.1f}" for n, g in f["matmul_gflops_by_size"].items())
    print("| phase | mean s | best s | warm-up s | GFLOP/s | / matmul rate | / update |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| fp32 matmul, all ranks at once ({sizes}) | | | | {f['matmul_gflops']:.1f} | 1.000 | |")
    print(f"| fp32 matmul again, after the timed phases | | | | {f['matmul_gflops_after']:.1f} "
          f"| {f['matmul_gflops_after'] / f['matmul_gflops']:.3f} | |")
    print(f"| actor update (train_step) | {u['mean_s']:.2f} | {u['best_s']:.2f} | {u['warmup_s']:.2f} "
          f"| {u['gflops']:.1f} | {u['mfu_vs_matmul']:.3f} | 1.000 |")
    print(f"| reference log-probs (ref.logps) | {r['mean_s']:.2f} | {r['best_s']:.2f} | {r['warmup_s']:.2f} "
          f"| {r['gflops']:.1f} | {r['mfu_vs_matmul']:.3f} | {r['vs_update']:.3f} |")
    m = u["metrics"] or {}
    print(f"\nlast step: loss {m.get('loss', float('nan')):.4f}, grad norm {m.get('grad_norm', float('nan')):.3f}; "
          f"model build+load {f['build_s']:.1f} s; materialise/convert {f['setup_s']:.1f} s; "
          f"launch {f['launch_s']:.1f} s; total {f['total_s']:.1f} s; 1-min load average "
          f"{f['loadavg_1min']['start']:.2f} at start, {f['loadavg_1min']['end']:.2f} at end "
          f"(above {f['cpu_count']} means other processes shared the cores)")


if __name__ == "__main__":
    sys.exit(main())
