"""One GPU, a few minutes: as much of megatron_spin's GPU path as runs without Ray, SGLang or TE.

Computes, on one CUDA GPU with only a recent CUDA torch (and transformers) preinstalled, no
network, and the pure-Python wheels below carried in, then prints one JSON summary (last line):

  platform       CUDA, device, NCCL, what megatron_spin's platform detects (TE, fused softmax)
  parity         the Megatron model (TP=1, local spec) against HF on the same random Llama: max
                 |logit| and |log-prob| differences in fp32 (no TF32) and in bf16
  update         one bf16 DPO update (reference pass + actor forward/backward + Adam step) of a
                 randomly initialised Llama-shaped model of ~1.5B parameters: step seconds,
                 achieved TFLOP/s (model FLOPs, spec.flops) and MFU against the data-sheet peak
  push           the run's tensor push (feed route: CUDA IPC from the trainer rank's GPU) into an
                 embedded engine serving the same model on the same GPU: GB/s against a
                 device-to-device copy of the same bytes, and the log-prob probe after the push
  resume         the distributed optimizer (bf16) saved and resumed through train/checkpoint.py:
                 parameters after two more updates against the uninterrupted run
  moe            a random Qwen3-MoE (8 experts, top 2) on Megatron's MoE layer (router, all-to-all
                 dispatcher, local spec): parity with HF in fp32 and bf16 as above, then one bf16
                 DPO update with the load-balancing loss on (finite loss and grad norm)

Every check runs in its own bounded process and reports ok/failed with its error; one failing
does not stop the others.  ``--cpu-smoke`` runs the same checks with tiny sizes on the CPU (the
test suite does, so the script itself is tested where there is no GPU).

On a GPU machine without network: the wheels of ``constraints/gpu-check-wheels.txt`` (5.5 MB;
the command is in that file) travel in ``.whl``, then::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --json gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    parity: dict  # HF LlamaConfig kwargs
    update: dict  # Megatron model of the update check
    pairs: int
    prompt_len: int
    response_len: int
    micro_pairs: int
    push: dict  # the pushed model
    dtype: str


GPU = Sizes("cuda", parity=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                                num_key_value_heads=8, vocab_size=32000),
            update=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=8, vocab_size=32000),
            pairs=8, prompt_len=256, response_len=256, micro_pairs=2,
            push=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000),
            dtype="bfloat16")
_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256)
# Qwen3-MoE kwargs of the moe check (the parity and update models).
MOE_GPU = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, num_experts=8, num_experts_per_tok=2,
               num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=32000)
MOE_TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
CPU_SMOKE = Sizes("cpu", parity=_TINY, update=_TINY, pairs=4, prompt_len=8, response_len=8, micro_pairs=2, push=_TINY,
                  dtype="float32")


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def random_llama(out: Path, cfg: dict, dtype: str, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                         **cfg))
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def random_qwen3_moe(out: Path, cfg: dict, dtype: str, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **cfg))
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def arch_of(cfg: dict):
    from megatron_spin.spec.arch import arch_from_hf_config

    return arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048,
                                "rms_norm_eps": 1e-5, **cfg}, source="gpu_check")


# -- checks (each in a bounded process: megatron_spin.parallel.launch) ----------------------------
def check_platform(sizes: Sizes) -> dict:
    import importlib.metadata

    import torch

    from megatron_spin import platform

    plat = platform.current()
    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "platform": dataclasses.asdict(plat),
           "megatron_core": importlib.metadata.version("megatron-core"),
           "transformers": importlib.metadata.version("transformers")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    elif sizes.device == "cuda":
        raise RuntimeError("no CUDA device")
    return out


def _parity_rank(rank, world_size, models):
    """{dtype: differences} for each (HF dir, Megatron dir, dtype) of ``models``, in one process."""
    out = {}
    for hf_dir, mcore_dir, dtype in models:
        out[dtype] = _parity_one(hf_dir, mcore_dir, dtype)
    return out


def _parity_one(hf_dir, mcore_dir, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.convert.parity import token_logprobs
    from megatron_spin.models.builder import build_model
    from megatron_spin.models.forward import forward_logits
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.spec.precision import Precision

    from megatron_spin.parallel.groups import destroy_parallel

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    arch = read_arch(mcore_dir)
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    destroy_parallel()  # a fresh parallel state (and model-parallel RNG) for each model
    pctx = init_parallel(ParallelLayout())
    chunks = build_model(arch, pctx, Precision(dtype), init_weights=False)
    load_model_weights(chunks, mcore_dir)
    ours = forward_logits(chunks, pctx, ids)
    device = next(chunks[0].parameters()).device
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager")
    with torch.no_grad():
        theirs = hf.to(device)(input_ids=ids.to(device)).logits.float().cpu()
    return {"max_abs_logit_diff": float((ours - theirs).abs().max()),
            "max_logprob_diff": float((token_logprobs(ours, ids) - token_logprobs(theirs, ids)).abs().max())}


def check_parity(sizes: Sizes, work: Path) -> dict:
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.parallel.launch import launch

    models = []
    for dtype in ("float32", "bfloat16"):
        hf = random_llama(work / f"parity-hf-{dtype}", sizes.parity, dtype)
        convert_hf_to_megatron(hf, work / f"parity-mcore-{dtype}", log=lambda *_: None)
        models.append((str(hf), str(work / f"parity-mcore-{dtype}"), dtype))
    (out,) = launch(_parity_rank, 1, (models,), timeout=600)  # both dtypes in one rank process
    # fp32 on both sides agrees to rounding; bf16 to bf16's 3 significant digits
    out["ok"] = out["float32"]["max_logprob_diff"] <= 1e-3 and out["bfloat16"]["max_logprob_diff"] <= 0.25
    return out


def _pairs(sizes: Sizes, vocab: int, seed: int):
    import torch

    from megatron_spin.pairs import PreferencePair

    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [PreferencePair(f"p{i}", rand(sizes.prompt_len), rand(sizes.response_len), rand(sizes.response_len),
                           1.0, 0.0, None) for i in range(sizes.pairs)]


def _update_rank(rank, world_size, sizes: Sizes):
    import torch

    from megatron_spin import platform
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.pairs import collate_pairs
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.platform.peak import peak_flops
    from megatron_spin.spec.flops import model_flops_utilization, train_step_flops
    from megatron_spin.spec.precision import Precision
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.train.reference import Reference

    arch = arch_of(sizes.update)
    pctx = init_parallel(ParallelLayout())
    precision = Precision(sizes.dtype)
    built = time.monotonic()
    actor = Actor.build(arch, pctx, OptimConfig(lr=1e-6), LossConfig(beta=0.1), precision=precision)
    ref = Reference.build(arch, pctx, precision=precision)
    params = sum(p.numel() for c in actor.modules for p in c.parameters())
    build_seconds = time.monotonic() - built
    batch = collate_pairs(_pairs(sizes, arch.vocab_size, 0), pad_id=0)
    mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, sizes.micro_pairs), 0, 1)
    sync = torch.cuda.synchronize if platform.current().is_cuda else (lambda: None)
    times, losses = [], []
    for i in range(3):  # the first is a warm-up (allocator, kernels)
        sync()
        t0 = time.monotonic()
        metrics = actor.train_step(mbs, ref.logps(mbs))
        sync()
        times.append(time.monotonic() - t0)
        losses.append(metrics["loss"])
    seconds = min(times[1:])
    tokens = batch.tokens.numel()
    flops = train_step_flops(arch, tokens, batch.tokens.shape[1], recompute=False, reference=True)
    peak, source = peak_flops(sizes.dtype)
    out = {"params_billion": params / 1e9, "tokens": tokens, "step_seconds": seconds, "all_seconds": times,
           "build_seconds": build_seconds, "losses": losses,
           "achieved_tflops": flops / seconds / 1e12, "peak_tflops": peak / 1e12 if peak else None,
           "peak_source": source, "mfu": model_flops_utilization(flops, seconds, 1, peak) if peak else None}
    if platform.current().is_cuda:
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def check_update(sizes: Sizes, work: Path) -> dict:
    from megatron_spin.parallel.launch import launch

    (out,) = launch(_update_rank, 1, (sizes,), timeout=420)
    out["ok"] = all(map(lambda x: x == x and abs(x) < 1e4, out["losses"]))  # finite losses
    return out


def _push_rank(rank, world_size, mcore_dir, url, api_key, sizes: Sizes):
    import torch

    from megatron_spin import platform
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.spec.precision import Precision
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from megatron_spin.sync.push import PushCoordinator, StageSender
    from megatron_spin.sync.routing import FeedRoute
    from megatron_spin.sync.transports import make_transport
    from megatron_spin.sync.verify import probe_gap, trainer_token_logprobs

    arch = read_arch(mcore_dir)
    pctx = init_parallel(ParallelLayout())
    chunks = build_model(arch, pctx, Precision(sizes.dtype), init_weights=False)
    load_model_weights(chunks, mcore_dir)
    params = [p.detach() for c in chunks for p in c.parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    sync = torch.cuda.synchronize if platform.current().is_cuda else (lambda: None)
    dst = [torch.empty_like(p) for p in params]
    copies = []
    for _ in range(4):
        sync()
        t0 = time.monotonic()
        for d, p in zip(dst, params):
            d.copy_(p)
        sync()
        copies.append(time.monotonic() - t0)
    del dst
    # The run's push path: the coordinator beside the fleet, the sender on the rank (both here).
    cfg = SyncConfig(transport="tensor", bucket_mb=512)
    route = FeedRoute(feeders=((0,),), rank_devices=("cuda:0" if platform.current().is_cuda else "cpu:0",))
    target = PushTarget(api_key=api_key, route=route)
    fleet = RolloutFleet([EngineClient(url, api_key, timeout=600)])
    coordinator = PushCoordinator(arch, fleet, make_transport(cfg, target))
    sender = StageSender(cfg, target, arch, pctx, "127.0.0.1")
    reports = []
    for version in range(1, 4):
        plan = coordinator.prepare(version)
        reports.append(coordinator.finish(plan, [sender.send(chunks, plan)]))
    sender.close()
    probe = [torch.randint(0, arch.vocab_size, (48,), generator=torch.Generator().manual_seed(s)).tolist()
             for s in range(2)]
    gap = probe_gap(trainer_token_logprobs(chunks, pctx, probe), [fleet.slots[0].client], probe)
    fleet.close()
    best = min(reports, key=lambda r: r.seconds)
    copy = min(copies[1:])
    return {"bytes": nbytes, "push_seconds": best.seconds, "push_gb_per_s": best.bytes / best.seconds / 1e9,
            "buckets": best.buckets, "copy_seconds": copy, "copy_gb_per_s": nbytes / copy / 1e9,
            "push_over_copy": best.seconds / copy, "all_push_seconds": [r.seconds for r in reports],
            "probe_max_gap": max(gap.max_abs.values()), "probe_mean_gap": max(gap.mean_abs.values())}


def check_push(sizes: Sizes, work: Path) -> dict:
    import secrets

    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.parallel.launch import launch
    from megatron_spin.rollout.launcher import launch_embedded

    hf = random_llama(work / "push-hf", sizes.push, sizes.dtype, seed=1)
    convert_hf_to_megatron(hf, work / "push-mcore", log=lambda *_: None)
    key = secrets.token_urlsafe(16)
    with launch_embedded(hf, api_key=key, log_path=work / "engine.log", device=sizes.device, dtype=sizes.dtype,
                         timeout=600) as server:
        (out,) = launch(_push_rank, 1, (str(work / "push-mcore"), server.url, key, sizes), timeout=420)
    out["ok"] = out["probe_mean_gap"] <= (1e-4 if sizes.dtype == "float32" else 0.05)
    return out


def _resume_rank(rank, world_size, mcore_dir, where, sizes: Sizes):
    import torch

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.pairs import collate_pairs
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.spec.precision import Precision
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.checkpoint import load_train_state, save_train_state
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.train.reference import Reference

    torch.use_deterministic_algorithms(True, warn_only=True)
    arch = read_arch(mcore_dir)
    pctx = init_parallel(ParallelLayout())
    optim = OptimConfig(lr=1e-4, lr_warmup_steps=1, lr_decay_steps=6, lr_decay_style="cosine",
                        use_distributed_optimizer=True)
    batch = collate_pairs(_pairs(sizes, arch.vocab_size, 1), pad_id=0)
    mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, sizes.micro_pairs), 0, 1)

    def build():
        p = Precision(sizes.dtype)
        return (Actor.build(arch, pctx, optim, LossConfig(beta=0.1), precision=p, init_from=mcore_dir),
                Reference.build(arch, pctx, precision=p, init_from=mcore_dir))

    actor, ref = build()
    ref_logps = ref.logps(mbs)
    for _ in range(2):
        actor.train_step(mbs, ref_logps)
    save_train_state(actor, ref, where)
    straight = [actor.train_step(mbs, ref_logps)["loss"] for _ in range(2)]
    expected = [p.detach().clone() for c in actor.modules for p in c.parameters()]
    actor, ref = build()
    load_train_state(actor, ref, where)
    resumed = [actor.train_step(mbs, ref_logps)["loss"] for _ in range(2)]
    got = [p.detach() for c in actor.modules for p in c.parameters()]
    return {"losses_straight": straight, "losses_resumed": resumed,
            "bit_exact": all(torch.equal(a, b) for a, b in zip(expected, got)),
            "max_param_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(expected, got))}


def check_resume(sizes: Sizes, work: Path) -> dict:
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.parallel.launch import launch

    hf = random_llama(work / "resume-hf", sizes.parity, sizes.dtype, seed=2)
    convert_hf_to_megatron(hf, work / "resume-mcore", log=lambda *_: None)
    (out,) = launch(_resume_rank, 1, (str(work / "resume-mcore"), str(work / "resume-ckpt"), sizes), timeout=300)
    out["ok"] = out["bit_exact"] or out["max_param_diff"] <= 1e-6
    return out


def _moe_rank(rank, world_size, models, update_dir, sizes: Sizes):
    import torch

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.pairs import collate_pairs
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.spec.precision import Precision
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.train.reference import Reference

    out = {dtype: _parity_one(hf_dir, mcore_dir, dtype) for hf_dir, mcore_dir, dtype in models}
    destroy_parallel()
    arch = read_arch(update_dir)
    pctx = init_parallel(ParallelLayout())
    precision = Precision(sizes.dtype)
    actor = Actor.build(arch, pctx, OptimConfig(lr=1e-5), LossConfig(beta=0.1), precision=precision,
                        init_from=update_dir, moe_aux_loss_coeff=0.01)
    ref = Reference.build(arch, pctx, precision=precision, init_from=update_dir)
    batch = collate_pairs(_pairs(sizes, arch.vocab_size, 3), pad_id=0)
    mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, sizes.micro_pairs), 0, 1)
    metrics = actor.train_step(mbs, ref.logps(mbs))
    out["update"] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
    if torch.cuda.is_available():
        out["update"]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def check_moe(sizes: Sizes, work: Path) -> dict:
    import math

    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.parallel.launch import launch

    cfg = MOE_GPU if sizes.device == "cuda" else MOE_TINY
    models = []
    for dtype in ("float32", "bfloat16"):
        hf = random_qwen3_moe(work / f"moe-hf-{dtype}", cfg, dtype)
        convert_hf_to_megatron(hf, work / f"moe-mcore-{dtype}", log=lambda *_: None)
        models.append((str(hf), str(work / f"moe-mcore-{dtype}"), dtype))
    update_dir = models[0][1] if sizes.dtype == "float32" else models[1][1]
    (out,) = launch(_moe_rank, 1, (models, update_dir, sizes), timeout=600)
    u = out["update"]
    out["ok"] = (out["float32"]["max_logprob_diff"] <= 1e-3 and out["bfloat16"]["max_logprob_diff"] <= 0.25
                 and math.isfinite(u["loss"]) and math.isfinite(u["grad_norm"]))
    return out


CHECKS = {"platform": lambda s, w: check_platform(s), "parity": check_parity, "update": check_update,
          "push": check_push, "resume": check_resume, "moe": check_moe}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {list(CHECKS)}")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "checks": {}}
    started = time.monotonic()
    for name in args.only.split(","):
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            result = CHECKS[name](sizes, work)
            result.setdefault("ok", True)
        except Exception as exc:  # every check reports; one failing does not stop the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = time.monotonic() - t0
        summary["checks"][name] = result
        log(f"{name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s")
    summary["seconds"] = time.monotonic() - started
    summary["ok"] = all(r["ok"] for r in summary["checks"].values())
    text = json.dumps(summary, default=str)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    print(text, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
