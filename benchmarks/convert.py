"""Benchmark HF <-> Megatron checkpoint conversion against plain reads of the same files.

Computes, in one run and on the same safetensors files (page cache warm for every row: one
untimed read first, caches are not dropped):
  * plain sequential read throughput: raw ``open().read()`` and safetensors ``get_tensor``
    (+ ``clone()``, since get_tensor only maps the file),
    plus a copy with fsync (read + write + sync: the floor for anything that writes a copy);
  * HF -> Megatron conversion and Megatron -> HF export time, MB/s (1 MB = 1e6 bytes of model
    weights) and their ratio to the plain-read throughputs;
  * peak RSS of the rank process that does the conversion, against an idle rank that only
    imported torch + megatron and initialised the parallel state, the largest tensor and the
    model size; RSS is split into anonymous memory and file-backed (mmap'd safetensors) pages;
  * a bit-exact round-trip check of the exported tensors.
Without --hf-dir a random Llama model (GQA, untied embeddings) of about --size-mb is built
with transformers and saved in 200 MB shards.

    PYTHONPATH=. python benchmarks/convert.py [--hf-dir D] [--size-mb 600] [--dtype fp32|bf16]
        [--workdir W] [--keep] [--export-shard-mb 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

MB = 1e6
_ELEM = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def build_random_llama(out: Path, size_mb: float, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    width, vocab = (4 if dtype == "fp32" else 2), 32000
    params = size_mb * MB / width
    # Widest hidden size whose two embedding tables stay under half the model, as in real
    # checkpoints where the per-layer matrices carry most of the bytes.
    hidden = max([h for h in (256, 512, 1024, 2048, 4096) if 2 * vocab * h <= 0.5 * params] or [256])
    ffn = -(-8 * hidden // 3 // 256) * 256
    heads, kv = hidden // 64, max(1, hidden // 256)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * 64 + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200MB", safe_serialization=True)


def describe(hf_dir: Path) -> dict:
    """Files, total tensor bytes and the largest tensor, from the safetensors headers only."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    total, largest = 0, ("", 0)
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                n = _ELEM[s.get_dtype()]
                for d in s.get_shape():
                    n *= d
                total += n
                largest = max(largest, (k, n), key=lambda x: x[1])
    return {"files": files, "tensor_bytes": total, "file_bytes": sum(f.stat().st_size for f in files),
            "largest_name": largest[0], "largest_bytes": largest[1]}


def read_raw(files) -> float:
    buf, started = bytearray(64 << 20), time.perf_counter()  # reuse one buffer: time the I/O, not malloc
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - started


def read_safetensors(files) -> float:
    from safetensors import safe_open

    started = time.perf_counter()
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                # get_tensor alone is a zero-copy view of the mmap (installed safetensors):
                # clone() makes every byte actually come in, as the converter's writes do.
                h.get_tensor(k).clone()
    return time.perf_counter() - started


def copy_fsync(files, dst: Path) -> float:
    dst.mkdir(parents=True)
    started = time.perf_counter()
    for f in files:
        with open(f, "rb") as src, open(dst / f.name, "wb") as out:
            shutil.copyfileobj(src, out, 64 << 20)
            out.flush()
            os.fsync(out.fileno())  # the DCP writer syncs its files too (sync_files=True)
    seconds, _ = time.perf_counter() - started, shutil.rmtree(dst)
    return seconds


def _idle_rank(rank, world_size):
    # What every conversion rank pays before touching data: torch, megatron, parallel state.
    from megatron_spin.models.builder import build_model  # noqa: F401 - imports megatron.core models
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout

    init_parallel(ParallelLayout())
    return 0


class _RssSampler(threading.Thread):
    """Polls this process's descendants (the spawned rank) for anonymous vs file-backed RSS."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.02):
            for p in me.children(recursive=True):
                try:
                    m = p.memory_info()
                except psutil.Error:
                    continue
                self.anon, self.file = max(self.anon, m.rss - m.shared), max(self.file, m.shared)


def phase_main(phase: str, src: str, dst: str, shard_bytes: int, result: str) -> None:
    """One measured phase in a fresh process, so RUSAGE_CHILDREN is this phase's rank alone."""
    from megatron_spin.convert.pipeline import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_spin.parallel.launch import launch

    sampler, started, log = _RssSampler(), time.perf_counter(), lambda m: print(f"  {m}", file=sys.stderr)
    sampler.start()
    if phase == "idle":
        launch(_idle_rank, 1, (), timeout=600)
    elif phase == "to_megatron":
        convert_hf_to_megatron(src, dst, log=log, timeout=3600)
    else:
        convert_megatron_to_hf(src, dst, max_shard_bytes=shard_bytes, log=log, timeout=3600)
    seconds = time.perf_counter() - started
    sampler.stop.set(), sampler.join()
    # RUSAGE_CHILDREN: the largest waited-for descendant, i.e. the rank (KiB on Linux).
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    Path(result).write_text(json.dumps({"seconds": seconds, "peak_rss": rss,
                                        "peak_anon": sampler.anon, "peak_file": sampler.file}))


def run_phase(phase: str, src="", dst="", shard_bytes=0, workdir: Path = Path(".")) -> dict:
    result = workdir / f"{phase}.result.json"
    cmd = [sys.executable, __file__, "--_phase", phase, "--_src", str(src), "--_dst", str(dst),
           "--_shard-bytes", str(shard_bytes), "--_result", str(result)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def roundtrip_exact(a: Path, b: Path) -> bool:
    from megatron_spin.convert.hf_io import HFReader

    ra, rb = HFReader(a), HFReader(b)
    same = lambda x, y: x.dtype == y.dtype and x.equal(y)  # noqa: E731
    return sorted(ra.names()) == sorted(rb.names()) and all(same(ra.get(n), rb.get(n)) for n in ra.names())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", type=Path, help="existing HF safetensors model (default: build a random Llama)")
    p.add_argument("--size-mb", type=float, default=600, help="size of the random model")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the random model")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--export-shard-mb", type=float, default=2048, help="export shard size (tool default 2 GiB)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="an 8 MB model: seconds (the test suite runs it)")
    for hidden in ("--_phase", "--_src", "--_dst", "--_shard-bytes", "--_result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.size_mb = 8
    if a._phase:
        phase_main(a._phase, a._src, a._dst, int(a._shard_bytes), a._result)
        return 0

    t0 = time.perf_counter()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("copy", "megatron", "hf_out") + (() if a.hf_dir else ("hf",)):  # a reused --workdir starts clean
        shutil.rmtree(work / sub, ignore_errors=True)
    try:
        hf = a.hf_dir
        if hf is None:
            hf = work / "hf"
            print(f"building a random Llama of ~{a.size_mb:.0f} MB ({a.dtype}) in {hf}", file=sys.stderr)
            build_random_llama(hf, a.size_mb, a.dtype)
        d = describe(hf)
        files, size = d["files"], d["tensor_bytes"]
        read_raw(files)  # warm-up: every timed row below reads from the page cache
        t = {"raw_read": read_raw(files), "safetensors_read": read_safetensors(files),
             "copy_fsync": copy_fsync(files, work / "copy")}
        idle = run_phase("idle", workdir=work)
        to_m = run_phase("to_megatron", hf, work / "megatron", workdir=work)
        to_h = run_phase("to_hf", work / "megatron", work / "hf_out", int(a.export_shard_mb * MB), workdir=work)
        t |= {"idle_rank_launch": idle["seconds"], "hf_to_megatron": to_m["seconds"], "megatron_to_hf": to_h["seconds"]}
        exact = roundtrip_exact(hf, work / "hf_out")
        mcore_bytes = sum(f.stat().st_size for f in (work / "megatron").rglob("*") if f.is_file())
        fig = {
            "model_dir": str(hf), "files": len(files), "tensor_bytes": size, "file_bytes": d["file_bytes"],
            "megatron_ckpt_bytes": mcore_bytes, "largest_tensor": d["largest_name"],
            "largest_tensor_bytes": d["largest_bytes"], "seconds": t,
            "mb_per_s": {k: size / MB / v for k, v in t.items() if k != "idle_rank_launch"},
            "idle_rank": idle, "hf_to_megatron": to_m, "megatron_to_hf": to_h,
            "roundtrip_bit_exact": exact, "cpu_count": os.cpu_count(),
        }
        for k, r in (("hf_to_megatron", to_m), ("megatron_to_hf", to_h)):
            fig[k]["vs_raw_read"] = t["raw_read"] / t[k]
            fig[k]["vs_safetensors_read"] = t["safetensors_read"] / t[k]
            fig[k]["vs_copy_fsync"] = t["copy_fsync"] / t[k]
            # The spawn + torch/megatron import is a fixed cost; what is left scales with the model.
            fig[k]["mb_per_s_minus_idle_launch"] = size / MB / max(1e-9, t[k] - idle["seconds"])
            # ru_maxrss counts mmap'd file pages too (the reader maps the shards): the anon ratio
            # is the memory the conversion really holds.
            for m in ("rss", "anon"):
                extra = r[f"peak_{m}"] - idle[f"peak_{m}"]
                fig[k][f"{m}_over_idle_per_largest_tensor"] = extra / d["largest_bytes"]
                fig[k][f"{m}_over_idle_per_model"] = extra / size
        fig["total_run_seconds"] = time.perf_counter() - t0
        print_table(fig)
        if a.json:
            a.json.write_text(json.dumps(fig, indent=2))
    finally:
        if not (a.keep or a.workdir):
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(f: dict) -> None:
    mb = lambda b: f"{b / MB:,.1f} MB"  # noqa: E731
    s, r = f["seconds"], f["mb_per_s"]
    print(f"\nmodel: {f['files']} safetensors files, {mb(f['tensor_bytes'])} of tensors; largest tensor "
          f"{f['largest_tensor']} = {mb(f['largest_tensor_bytes'])}; Megatron checkpoint {mb(f['megatron_ckpt_bytes'])}; "
          f"{f['cpu_count']} CPUs; page cache warm (one untimed read first, caches not dropped)\n")
    print("| phase | seconds | MB/s | MB/s excl. idle launch | conv / raw read | conv / safetensors read "
          "| conv / copy+fsync |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in ("raw_read", "safetensors_read", "copy_fsync"):
        print(f"| {k} | {s[k]:.2f} | {r[k]:,.0f} | | | | |")
    for k in ("hf_to_megatron", "megatron_to_hf"):
        c = f[k]
        print(f"| {k} | {s[k]:.2f} | {r[k]:,.0f} | {c['mb_per_s_minus_idle_launch']:,.0f} | {c['vs_raw_read']:.3f} "
              f"| {c['vs_safetensors_read']:.3f} | {c['vs_copy_fsync']:.3f} |")
    print(f"| idle rank launch (fixed cost in both) | {s['idle_rank_launch']:.2f} | | | | | |")
    print("\n| rank process | peak RSS | peak anon | peak file | (RSS-idle)/largest | (RSS-idle)/model "
          "| (anon-idle)/largest | (anon-idle)/model |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in ("idle_rank", "hf_to_megatron", "megatron_to_hf"):
        c = f[k]
        ratios = " | ".join(f"{c[f'{m}_over_idle_per_{w}']:.2f}" if k != "idle_rank" else ""
                            for m in ("rss", "anon") for w in ("largest_tensor", "model"))
        print(f"| {k} | {mb(c['peak_rss'])} | {mb(c['peak_anon'])} | {mb(c['peak_file'])} | {ratios} |")
    print(f"\nround trip bit-exact: {f['roundtrip_bit_exact']}; total run {f['total_run_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
