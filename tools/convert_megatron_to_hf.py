"""Export a Megatron-core distributed checkpoint written by megatron_spin as a Hugging Face model.

Reads one layer at a time (whatever TP/PP layout saved the checkpoint), maps Megatron names
to HF names through the same converter table as the import, and writes safetensors shards
(plus an index when there is more than one), config.json and the tokenizer files, so that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads it.  Tensors keep the
dtypes the HF source had.

    python tools/convert_megatron_to_hf.py --megatron-dir M --out D [--max-shard-size-gb 2]
"""

from __future__ import annotations

import argparse
import sys

from megatron_spin.convert.pipeline import convert_megatron_to_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-dir", required=True, help="Megatron dist checkpoint directory")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        convert_megatron_to_hf(args.megatron_dir, args.out, force=args.force,
                               max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
