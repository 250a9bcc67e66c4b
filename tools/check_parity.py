"""Check that the Megatron model computes what the Hugging Face model computes.

Runs the HF forward (transformers, fp32) and the Megatron forward — the dist checkpoint
loaded at ``--tp × --pp`` (× ``--vpp``, × ``--ep`` for MoE models), launched across TP·PP·EP local processes — on the
same token batch, prints the max absolute logit difference and the max per-token log-prob
difference, and exits 1 when either exceeds ``--tol`` (default 1e-4, fp32).

    python tools/check_parity.py --hf-dir D --megatron-dir M --tp 2 --pp 1
    python tools/check_parity.py --hf-dir D --megatron-dir M --tp 1 --pp 2 --text "Hello there"
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_spin.convert.parity import check_parity, sample_batch
from megatron_spin.parallel.layout import ParallelLayout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2, help="random-token batch size")
    p.add_argument("--seq-len", type=int, default=32, help="random-token sequence length")
    p.add_argument("--text", action="append", default=None,
                   help="use the tokenised text instead of random tokens (repeatable; right-padded)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the ranks are killed")
    args = p.parse_args(argv)
    layout = ParallelLayout(args.tp, args.pp, args.vpp, ep=args.ep)
    if args.text:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.hf_dir)
        enc = [tok(t)["input_ids"] for t in args.text]
        width = max(map(len, enc))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
    else:
        from megatron_spin.ckpt.metadata import read_arch

        input_ids = sample_batch(read_arch(args.megatron_dir).vocab_size, args.batch, args.seq_len)
    try:
        r = check_parity(args.hf_dir, args.megatron_dir, layout, input_ids, timeout=args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = "OK" if r.ok(args.tol) else "FAIL"
    print(f"TP={layout.tp} PP={layout.pp} VPP={layout.vpp or 1} EP={layout.ep} tokens={r.tokens}: "
          f"max |logit diff| = {r.max_abs_logit_diff:.3e}, max |log-prob diff| = {r.max_logprob_diff:.3e} "
          f"(tol {args.tol:g}) {verdict}")
    return 0 if r.ok(args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
