"""Benchmark weight pushes (per transport and bucket size) and embedded-engine generation.

Measured in one run on this machine, each figure beside its baseline:
  * **push**: a random Llama of ``--size-mb`` (default 600 MB, fp32) as a Megatron actor at
    TP=1 on one Ray-placed trainer rank, pushed to one embedded engine by each transport
    (tensor with flat buckets, tensor with (name, tensor) lists, disk, distributed/gloo, and shared:
    the engine inside the rank on the actor's own parameters) and bucket size, each configuration a run's own cluster; what is timed is ``TrainerCluster.push``,
    the call a run makes after every update (pause, flush, gather, convert, send, engine-side
    check and copy, commit, resume), best of ``--repeats``.
    Baseline: a plain in-memory copy of the same bytes (every tensor ``copy_`` into a
    preallocated tensor) in this process; ratio = push seconds / copy seconds.
    A log-prob probe after the pushes checks the engine really holds the actor's weights.
  * **generation**: the embedded model (SmolLM2-135M-Instruct) on ``--prompts`` chat prompts,
    ``--new-tokens`` greedy tokens each (``ignore_eos``, so every row makes the same count);
    the embedded engine over HTTP (one batched ``/generate``) against plain ``transformers``
    ``generate`` with the same batch (left padding, KV cache) in this process, each with the
    same thread count; tokens/s and their ratio, best of ``--repeats``.

    PYTHONPATH=. python benchmarks/weight_sync.py [--size-mb 600] [--buckets-mb 16,128,512]
        [--transports tensor,tensor-list,disk,distributed,shared] [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

MB = 1e6
PROBE = [[5, 17, 33, 2, 90, 41, 7, 64, 128, 3, 11]]


def _random_llama(out: Path, size_mb: float) -> None:
    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "benchmarks" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build_random_llama(out, size_mb, "fp32")


def _copy_seconds(ckpt: Path, repeats: int) -> tuple[int, float]:
    """Bytes of the model and the best time of a plain in-memory copy of them (the baseline)."""
    import torch
    from safetensors.torch import load_file

    params = [t for f in sorted(ckpt.glob("*.safetensors")) for t in load_file(f).values()]
    dst = [torch.empty_like(p) for p in params]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for d, p in zip(dst, params):
            d.copy_(p)
        times.append(time.perf_counter() - t0)
    return sum(p.numel() * p.element_size() for p in params), min(times[1:])  # the first pass faults pages in


def _push_config(hf: Path, mcore: Path, run_dir: Path, transport: str, load_format, bucket_mb: float):
    """The run config of a one-rank trainer and one embedded engine pushing by ``transport``."""
    from megatron_spin.config.run import ActorRolloutRefConfig, ModelConfig, RolloutConfig, RunConfig, TrainerConfig
    from megatron_spin.sync.config import SyncConfig

    sync = SyncConfig(transport=transport, load_format=load_format, bucket_mb=bucket_mb)
    return RunConfig(actor_rollout_ref=ActorRolloutRefConfig(model=ModelConfig(str(hf), str(mcore)),
                                                             rollout=RolloutConfig(sync=sync)),
                     trainer=TrainerConfig(default_local_dir=str(run_dir), timeout_s=1800.0))


def bench_pushes(args, work: Path) -> dict:
    """Each configuration is a real run's cluster (Ray, a trainer rank, an embedded engine): what is
    timed is ``TrainerCluster.push``, the call a run makes after every update."""
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.convert.prepare import PreparedModel
    from megatron_spin.orchestrate.cluster import TrainerCluster
    from megatron_spin.orchestrate.placement import Placement

    hf = work / "hf"
    if not (hf / "config.json").exists():
        print(f"[bench] building a random {args.size_mb:.0f} MB Llama ...", flush=True)
        _random_llama(hf, args.size_mb)
    mcore = work / "mcore"
    if not (mcore / "metadata.json").exists():
        convert_hf_to_megatron(hf, mcore, log=lambda *_: None)
    configs = []
    for t in args.transports.split(","):
        for b in (float(x) for x in args.buckets_mb.split(",")):
            configs.append(("tensor", None if t == "tensor-list" else "flattened_bucket", b) if t.startswith("tensor")
                           else (t, None, b))
    total, copy_s = _copy_seconds(hf, args.repeats)
    print(f"[bench] {len(configs)} push configurations x {args.repeats} ...", flush=True)
    arch, rows = read_arch(mcore), []
    for transport, load_format, bucket_mb in configs:
        run_dir = work / f"run-{transport}-{load_format}-{bucket_mb:g}"
        cfg = _push_config(hf, mcore, run_dir, transport, load_format, bucket_mb)
        shared = transport == "shared"  # the engine lives in the rank (and is colocated by nature)
        placement = Placement.plan(tp=1, pp=1, nnodes=1, gpus_per_node=0, num_engines=1, engine_tp=1,
                                   colocated=shared, engines_in_ranks=shared)
        with TrainerCluster(cfg, arch, placement, PreparedModel(hf, mcore), run_dir) as cluster:
            cluster.push(0)  # untimed warm-up: first use of shared memory, the engine's first load, page faults
            reports = [cluster.push(v) for v in range(1, args.repeats + 1)]
            gap = cluster.verify_push(PROBE)
        best = min(reports, key=lambda r: r.seconds)
        rows.append({"transport": transport if load_format or transport != "tensor" else "tensor-list",
                     "bucket_mb": bucket_mb, "seconds": best.seconds, "send_seconds": best.send_seconds,
                     "commit_seconds": best.commit_seconds, "buckets": best.buckets,
                     "all_seconds": [r.seconds for r in reports], "logprob_gap": max(gap.max_abs.values())})
    return {"bytes": total, "copy_seconds": copy_s, "rows": rows}


def bench_generation(args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_spin.packaged.smollm2 import materialize_smollm2
    from megatron_spin.rollout.launcher import launch_embedded
    from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams

    model_dir = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    topics = ["a rainy day", "the ocean", "learning to cook", "a lost key", "city lights", "old books",
              "a mountain trail", "morning coffee", "a quiet library", "the first snow"]
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Write a short story about {topics[i % 10]}."}],
                                     tokenize=False, add_generation_prompt=True) for i in range(args.prompts)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_new = args.new_tokens
    threads = torch.get_num_threads()

    sampling = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True)
    engine_times = []
    with launch_embedded(model_dir, log_path=work / "gen-engine.log", threads=threads) as server:
        client = server.client(timeout=1800)
        client.generate(GenerateRequest((tuple(ids[0]),), SamplingParams(max_new_tokens=2)))  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            replies = client.generate(GenerateRequest(tuple(map(tuple, ids)), sampling))
            engine_times.append(time.perf_counter() - t0)
        engine_out = [r[0].output_ids for r in replies]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    hf_times = []
    with torch.inference_mode():
        model.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            hf_times.append(time.perf_counter() - t0)
    hf_out = [tuple(row[batch["input_ids"].shape[1]:].tolist()) for row in out]
    tokens = args.prompts * n_new
    same = sum(a == b for a, b in zip(engine_out, hf_out))
    return {"prompts": args.prompts, "new_tokens": n_new, "threads": threads,
            "engine_tok_s": tokens / min(engine_times), "hf_tok_s": tokens / min(hf_times),
            "engine_seconds": engine_times, "hf_seconds": hf_times, "identical_outputs": same}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=600)
    p.add_argument("--buckets-mb", default="16,128,512")
    p.add_argument("--transports", default="tensor,tensor-list,disk,distributed,shared")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-push", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--workdir", type=Path, help="scratch directory, reused between runs (default: temporary)")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="an 8 MB model, two transports, tiny generation (tests)")
    args = p.parse_args()
    if args.quick:
        args.size_mb, args.buckets_mb, args.transports, args.repeats = 8, "1", "tensor,disk,shared", 1
        args.prompts, args.new_tokens = 2, 4
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, workdir {work}")
    out: dict = {}
    if not args.skip_push:
        r = out["push"] = bench_pushes(args, work)
        print(f"\nweight push: {r['bytes'] / MB:.0f} MB; plain in-memory copy {r['copy_seconds']:.3f} s "
              f"= {r['bytes'] / MB / r['copy_seconds']:.0f} MB/s")
        print(f"{'transport':<12} {'bucket MB':>9} {'buckets':>7} {'push s':>8} {'MB/s':>7} {'÷ copy':>7} "
              f"{'send s':>7} {'commit s':>8} {'logprob gap':>11}")
        for row in r["rows"]:
            print(f"{row['transport']:<12} {row['bucket_mb']:>9.0f} {row['buckets']:>7} {row['seconds']:>8.2f} "
                  f"{r['bytes'] / MB / row['seconds']:>7.0f} {row['seconds'] / r['copy_seconds']:>7.1f} "
                  f"{row['send_seconds']:>7.2f} {row['commit_seconds']:>8.2f} {row['logprob_gap']:>11.1e}")
    if not args.skip_generation:
        g = out["generation"] = bench_generation(args, work)
        print(f"\ngeneration ({g['prompts']} prompts x {g['new_tokens']} greedy tokens, {g['threads']} threads): "
              f"embedded engine {g['engine_tok_s']:.1f} tok/s, transformers generate {g['hf_tok_s']:.1f} tok/s, "
              f"ratio {g['engine_tok_s'] / g['hf_tok_s']:.2f}; identical outputs {g['identical_outputs']}/{g['prompts']}")
    print(f"[bench] load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
