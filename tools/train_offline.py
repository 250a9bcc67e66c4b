"""Train the actor with a DPO-family loss from a preference file (offline mode).

Reads JSONL records ``{"prompt", "chosen", "rejected"}`` (prompt: text or chat messages),
tokenises them with the tokenizer stored in the Megatron checkpoint's ``hf/`` folder,
trains on TP × PP local ranks for ``--epochs`` and evaluates held-out pairs (``--eval-file``)
before training and after each epoch.  Prints one line per step at the end and writes every metric
record to ``--metrics`` (JSONL) when training ends; ``--save-dir`` publishes the trained actor
as a Megatron checkpoint (atomically) that tools/convert_megatron_to_hf.py exports.  The online trainer with rollouts is ``megatron-spin-train``
(coming); this tool runs the same update step.

    python tools/train_offline.py --megatron-dir M --train-file train.jsonl --eval-file eval.jsonl \\
        --tp 2 --global-pairs 8 --micro-pairs 2 --lr 1e-6 --beta 0.1 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_spin.loss.config import LossConfig
from megatron_spin.errors import ConfigError
from megatron_spin.train.config import BatchConfig, OptimConfig
from megatron_spin.parallel.launch import LaunchError
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.train.offline import OfflineConfig, train_offline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--eval-file")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--global-pairs", type=int, default=8)
    p.add_argument("--micro-pairs", type=int, default=1)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--ref-update-freq", type=int, default=0)
    p.add_argument("--metrics", default=None, help="write metric records here (JSONL)")
    p.add_argument("--save-dir", default=None, help="publish the trained actor here (Megatron checkpoint)")
    args = p.parse_args(argv)
    try:
        cfg = OfflineConfig(
            megatron_dir=args.megatron_dir, train_file=args.train_file, eval_file=args.eval_file,
            layout=ParallelLayout(args.tp, args.pp),
            batch=BatchConfig(args.global_pairs, args.micro_pairs),
            optim=OptimConfig(optimizer=args.optimizer, lr=args.lr, clip_grad=args.clip_grad),
            loss=LossConfig(loss_type=args.loss_type, beta=args.beta, label_smoothing=args.label_smoothing),
            epochs=args.epochs, max_length=args.max_length, ref_update_freq=args.ref_update_freq,
            save_dir=args.save_dir,
        )
        history = train_offline(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:  # raised inside a rank: its traceback is in the message
        print(f"error: {e}", file=sys.stderr)
        return 1
    for h in history:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items()))
    if args.metrics:
        with open(args.metrics, "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
    return 0


if __name__ == "__main__":
    sys.exit(main())
