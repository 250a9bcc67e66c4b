"""Benchmark one Online-DPO actor update and one reference log-prob pass on SmolLM2-135M.

Computes, in one launch on this machine (every figure from the same rank processes):
  * fp32 matmul rate: ``torch.matmul`` of square fp32 matrices (n = 1024, 2048) on every rank at
    once, each with the training ranks' thread count (``launch``: ``cpu_count // world_size``, at
    least 1); GFLOP/s = 2·n³·reps·ranks / wall time, best of 5, measured before and after the
    timed phases; the best of all is the denominator of the MFU-like ratios;
  * the update: ``--pairs`` random-token pairs (prompt ``seq_len // 4`` tokens; chosen and rejected
    responses ``seq_len - prompt`` tokens, so all 2·pairs rows are exactly ``--seq-len`` with no
    padding), ``actor.train_step`` (Adam, DPO sigmoid) ``--steps`` times after one untimed
    warm-up step; seconds (mean, best), FLOP/s, and the share spent in ``optimizer.step``;
  * the reference pass: ``ref.logps`` over the same micro-batches, ``--steps`` timed passes after
    one untimed one (which also gives the reference log-probs), and its cost relative to an update.

FLOP model (PaLM/Megatron "6N + attention"; S = row length, T = 2·pairs·S = all tokens of all rows):
    N      = matmul parameters: per layer Q, K, V, O + gated MLP (3·hidden·ffn), plus the LM head
             (vocab·hidden); embedding lookup and norms do no matmul work
    update = 6·N·T + 12·L·d·S²·(2·pairs)   fwd+bwd; d = heads·head_dim (= hidden for SmolLM2)
    ref    = 2·N·T +  4·L·d·S²·(2·pairs)   fwd only
The attention term counts the full S×S scores (no causal halving).  "/matmul" = achieved FLOP/s
over the measured matmul rate (MFU against this machine, not a vendor peak).  The machine is
shared: the 1-minute load average at start and end is printed so contention is visible.

    PYTHONPATH=. python benchmarks/train_step.py [--pairs 4] [--micro-pairs 1] [--seq-len 256]
        [--steps 3] [--tp 1 --pp 1] [--workdir W] [--json OUT]

The converted Megatron checkpoint is cached in ``--workdir`` (default: beside the embedded HF
model, ``~/.cache/megatron_spin``) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout


def timed(fn, barrier):
    barrier()  # every rank enters together, and the step ends when the last rank finishes
    t0 = time.perf_counter()
    out = fn()
    barrier()
    return time.perf_counter() - t0, out


def matmul_rate(sizes=(1024, 2048), trials=5) -> dict:
    """{n: aggregate fp32 matmul GFLOP/s of all ranks running at once}; call on every rank."""
    import torch
    import torch.distributed as dist

    world, best = dist.get_world_size(), {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        reps = max(2, int(8e9 // (2 * n**3)))  # >= ~8 GFLOP per rank per trial: long enough to time
        torch.matmul(a, b)  # warm-up: thread pool start, first-touch of the output
        for _ in range(trials):
            # All ranks start together (they share the cores as in training); the slowest one
            # decides the wall time.
            dt, _ = timed(lambda: [torch.matmul(a, b) for _ in range(reps)], dist.barrier)
            best[n] = max(best.get(n, 0.0), world * reps * 2 * n**3 / dt / 1e9)
    return best


def _bench_rank(rank, world_size, ckpt, layout, batch, micro_pairs, steps):
    import torch
    import torch.distributed as dist

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    mm = matmul_rate()  # before the models exist: nothing else in memory or on the cores
    arch = read_arch(ckpt)
    pctx = init_parallel(layout)
    t_build, (actor, ref) = timed(lambda: (
        Actor.build(arch, pctx, OptimConfig(optimizer="adam", lr=1e-6), LossConfig(), init_from=ckpt),
        Reference.build(arch, pctx, init_from=ckpt)), dist.barrier)
    mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, micro_pairs), pctx.dp_rank, pctx.dp_size)
    t_ref_warm, ref_logps = timed(lambda: ref.logps(mbs), dist.barrier)
    ref_times = [timed(lambda: ref.logps(mbs), dist.barrier)[0] for _ in range(steps)]
    t_warm, _ = timed(lambda: actor.train_step(mbs, ref_logps), dist.barrier)
    # The 6·N·T estimate covers forward+backward only; the Adam step (memory-bound, ~N·16 bytes
    # of state) is timed apart by wrapping this instance's optimizer.step.
    opt_times, inner = [], actor.optimizer.step

    def opt_step(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        opt_times.append(time.perf_counter() - t)
        return out

    actor.optimizer.step = opt_step
    step_times, metrics = [], None
    for _ in range(steps):
        dt, metrics = timed(lambda: actor.train_step(mbs, ref_logps), dist.barrier)
        step_times.append(dt)
    mm_after = matmul_rate()  # again: a drop means something else took the cores meanwhile
    return {"threads": torch.get_num_threads(), "matmul": mm, "matmul_after": mm_after, "build_s": t_build,
            "ref_warmup_s": t_ref_warm, "ref_s": ref_times, "warmup_step_s": t_warm, "step_s": step_times,
            "opt_s": opt_times, "metrics": metrics, "last_stage": pctx.is_last_stage, "micro_batches": len(mbs)}


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
    p.add_argument("--tp", type=int, default=1), p.add_argument("--pp", type=int, default=1)  # DP = 1
    p.add_argument("--workdir", type=Path, help="where the converted checkpoint is cached")
    p.add_argument("--timeout", type=float, default=3600, help="deadline of the benchmark launch (s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="2 pairs of 32 tokens, 1 timed step (the test suite runs it)")
    a = p.parse_args()
    if a.quick:
        a.pairs, a.micro_pairs, a.seq_len, a.steps = 2, 1, 32, 1

    import torch

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.packaged.smollm2 import default_dir, materialize_smollm2
    from megatron_spin.pairs import PreferencePair, collate_pairs
    from megatron_spin.parallel.launch import launch
    from megatron_spin.parallel.layout import ParallelLayout, validate_layout

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    hf = materialize_smollm2()
    ckpt = (a.workdir or default_dir().parent) / "smollm2-135m-instruct-megatron"
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
    # Best of all matmul trials, before and after: contention only ever lowers a rate.
    mm = max(*r0["matmul"].values(), *r0["matmul_after"].values()) * 1e9
    fwd_bwd = [s - o for s, o in zip(r0["step_s"], r0["opt_s"])]  # rank 0's optimizer time per step

    def phase(times, flops, warmup=None, rel=None):
        mean, best = sum(times) / len(times), min(times)
        out = {"s": times, "mean_s": mean, "best_s": best, "warmup_s": warmup}
        if flops:
            out |= {"gflops": flops / mean / 1e9, "gflops_best": flops / best / 1e9,
                    "mfu": flops / mean / mm, "mfu_best": flops / best / mm}
        if rel:  # cost relative to one whole update
            out |= {"vs_update": mean / (sum(rel) / len(rel)), "vs_update_best": best / min(rel)}
        return out

    fig = {
        "model": "SmolLM2-135M-Instruct", "layout": {"tp": a.tp, "pp": a.pp, "dp": 1, "world": world},
        "threads_per_rank": r0["threads"], "cpu_count": os.cpu_count(), "pairs": a.pairs,
        "micro_pairs": a.micro_pairs, "micro_batches": r0["micro_batches"], "seq_len": batch.tokens.shape[1],
        "flop_model": fm, "flop_formula": {"update": "6*N*T + 12*L*d*S^2*(2*pairs)",
                                           "ref": "2*N*T + 4*L*d*S^2*(2*pairs)"},
        "matmul_gflops_before": r0["matmul"], "matmul_gflops_after": r0["matmul_after"], "matmul_gflops": mm / 1e9,
        # Other processes on the machine skew every figure: the 1-minute load average shows them.
        "loadavg_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "phases": {
            "actor update (train_step)": phase(r0["step_s"], fm["update_flops"], r0["warmup_step_s"], r0["step_s"]),
            "  of which fwd+bwd (update - optimizer.step)": phase(fwd_bwd, fm["update_flops"], rel=r0["step_s"]),
            "  of which optimizer.step (Adam, clip)": phase(r0["opt_s"], 0, rel=r0["step_s"]),
            "reference log-probs (ref.logps)": phase(r0["ref_s"], fm["ref_flops"], r0["ref_warmup_s"], r0["step_s"]),
        },
        "last_step_metrics": last["metrics"], "build_s": r0["build_s"], "setup_s": setup_s, "launch_s": launch_s,
        "total_s": time.perf_counter() - started,
    }
    print_table(fig)
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2))
    return 0


def print_table(f: dict) -> None:
    fm, lay = f["flop_model"], f["layout"]
    own = max(f["cpu_count"], lay["world"] * f["threads_per_rank"])  # this run alone keeps this many busy
    print(f"\nSmolLM2-135M, TP={lay['tp']} PP={lay['pp']} ({lay['world']} ranks x {f['threads_per_rank']} threads, "
          f"{f['cpu_count']} CPUs); {f['pairs']} pairs x 2 rows x {f['seq_len']} tokens = {fm['tokens']} tokens, "
          f"{f['micro_batches']} micro-batches of {f['micro_pairs']} pair(s); "
          f"N = {fm['n_matmul_params'] / 1e6:.1f} M matmul params")
    print(f"FLOPs: update = 6*N*T + 12*L*d*S^2*rows = {fm['update_flops'] / 1e12:.3f} TFLOP; "
          f"ref = 2*N*T + 4*L*d*S^2*rows = {fm['ref_flops'] / 1e12:.3f} TFLOP")
    sizes = lambda d: ", ".join(f"n={n}: {g:.1f}" for n, g in d.items())  # noqa: E731
    print(f"fp32 matmul GFLOP/s, all ranks at once: before {sizes(f['matmul_gflops_before'])}; after "
          f"{sizes(f['matmul_gflops_after'])}; rate used = best = {f['matmul_gflops']:.1f}\n")
    print("| phase | mean s | best s | warm-up s | GFLOP/s mean | GFLOP/s best | /matmul mean | /matmul best "
          "| /update mean | /update best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cell = lambda x, k, fmt: format(x[k], fmt) if x.get(k) is not None else ""  # noqa: E731
    for name, x in f["phases"].items():
        print(f"| {name} | {x['mean_s']:.2f} | {x['best_s']:.2f} | {cell(x, 'warmup_s', '.2f')} "
              f"| {cell(x, 'gflops', '.1f')} | {cell(x, 'gflops_best', '.1f')} | {cell(x, 'mfu', '.3f')} "
              f"| {cell(x, 'mfu_best', '.3f')} | {cell(x, 'vs_update', '.3f')} | {cell(x, 'vs_update_best', '.3f')} |")
    m = f["last_step_metrics"] or {}
    print(f"\nlast step: loss {m.get('loss', float('nan')):.4f}, grad norm {m.get('grad_norm', float('nan')):.3f}; "
          f"model build+load {f['build_s']:.1f} s; materialise/convert {f['setup_s']:.1f} s; "
          f"launch {f['launch_s']:.1f} s; total {f['total_s']:.1f} s; 1-min load average "
          f"{f['loadavg_1min']['start']:.2f} at start, {f['loadavg_1min']['end']:.2f} at end "
          f"(well above {own} = this run's ranks x threads means other processes shared the cores)")


if __name__ == "__main__":
    sys.exit(main())
