"""Convert a Hugging Face model (safetensors) into a Megatron-core distributed checkpoint.

Streams tensor by tensor through the converter table for the architecture (Llama /
Mistral-style / Qwen2), so memory stays around one layer's tensor even for 70B models.
The checkpoint's keys do not depend on the parallel layout: it loads at any TP/PP.
``--tp/--pp/--vpp`` check that the layout you intend to train with is valid for the model
before any work is done.  The HF config and tokenizer files are kept in ``OUT/hf/`` so the
checkpoint can be exported back with tools/convert_megatron_to_hf.py.

    python tools/convert_hf_to_megatron.py --hf-dir D --out M [--tp T --pp P] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.parallel.layout import ParallelLayout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate against")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate against")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="store weights in this dtype (default: keep the HF dtype)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        convert_hf_to_megatron(args.hf_dir, args.out, layout=ParallelLayout(args.tp, args.pp, args.vpp, ep=args.ep),
                               dtype=args.dtype, force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
