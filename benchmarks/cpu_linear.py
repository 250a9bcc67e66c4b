"""Weight-first against plain linear layers on this CPU, at the shapes of SmolLM2-135M.

For each weight shape (N outputs x K inputs) and row count M, times ``F.linear(x, W)`` (MKL gets
``x Wᵀ``) and ``platform.cpu_linear.WeightFirstLinear`` (``(W xᵀ)ᵀ``), alternating the two, best
of ``--trials``, with the torch thread count the embedded engine gets (all cores).  Decoding
runs the rows of a whole batch through every layer once per token: M = 16 is the vs_trl
workload's decode step (8 prompts x 2 samples); the prefill of a batch has M = batch x prompt.

    python benchmarks/cpu_linear.py [--rows 1 2 16 64 256] [--trials 5] [--json OUT]
    python benchmarks/cpu_linear.py --quick      # tiny: what the test suite runs

Last line: one JSON object, per shape and M the two times and plain / weight-first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

# SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, MLP 1536, vocabulary 49152.
SHAPES = {"q/o proj": (576, 576), "k/v proj": (192, 576), "gate/up proj": (1536, 576),
          "down proj": (576, 1536), "LM head": (49152, 576)}
QUICK_SHAPES = {"proj": (64, 32), "head": (512, 32)}


def seconds(fn, x, reps: int) -> float:
    fn(x)  # warm-up: thread pool, first touch of the output
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 16, 64, 256])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from megatron_spin.platform.cpu_linear import WeightFirstLinear

    torch.set_num_threads(os.cpu_count() or 1)
    shapes, rows, trials = (QUICK_SHAPES, [1, 16], 2) if args.quick else (SHAPES, args.rows, args.trials)
    out = {"threads": torch.get_num_threads(), "rows": rows, "shapes": {}}
    print(f"{'shape':>14} {'N x K':>11} {'M':>5} {'x Wᵀ ms':>9} {'W xᵀ ms':>9} {'ratio':>6}")
    with torch.inference_mode():
        for name, (n, k) in shapes.items():
            layer = WeightFirstLinear(k, n, bias=False)
            reps = max(2, int(2e8 // (n * k * 8)))  # ~0.2 G multiply-adds per timing at M = 1
            per = out["shapes"][name] = {}
            for m in rows:
                x = torch.randn(m, k)
                plain, first = float("inf"), float("inf")
                for _ in range(trials):  # alternate, so drift hits both
                    plain = min(plain, seconds(lambda t: F.linear(t, layer.weight), x, reps))
                    first = min(first, seconds(layer, x, reps))
                per[m] = {"plain_ms": plain * 1e3, "weight_first_ms": first * 1e3, "ratio": plain / first}
                print(f"{name:>14} {f'{n}x{k}':>11} {m:>5} {plain * 1e3:9.3f} {first * 1e3:9.3f} {plain / first:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(out))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
