"""Weight push of a Qwen3-MoE actor under expert parallelism into a real embedded engine.

A tiny random Qwen3-MoE (2 layers, 4 experts, top 2, untied) is converted once; the embedded
engine loads the HF model natively (transformers fuses each layer's experts into 3-D
parameters; the engine takes the checkpoint's per-expert names, as SGLang does).  The trainer
loads the converted checkpoint at EP=2 — each data-parallel replica holds 2 of the 4 experts of
every layer — and before each push multiplies every parameter by a factor of its global
Megatron name and the push's version, so the engine's old tensors differ from the new ones
everywhere: a push that left an expert out, or sent one replica's experts under the other's
names, leaves a tensor unequal.  After each push every tensor the engine holds is read back
and compared **bit-exactly** (fp32) with the HF checkpoint's tensor times the same factor (the
conversion only moves data, so the product commutes with it), and the engine's log-probs of
fixed sequences with the trainer's.

Jobs: EP=2 on 2 ranks with the tensor (feed: replica 1 has no feeder and walks for its
experts), distributed and disk transports (stage: replica 1 lends its experts to replica 0's
pusher); TP=2 x EP=2, PP=2 x EP=2 and EP=2 at DP=4 (replicas 2 and 3 form an EP group of their
own that neither feeds nor lends) on 4 ranks with the tensor and distributed transports.
And the negative: a disk push whose pusher leaves EP rank 1's experts out (a simulated fault)
fails the receipts check on every rank, and the engine's version is not advanced.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.rollout.launcher import launch_embedded
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf
from tests.dist.test_weight_sync import API_KEY

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

EXPERTS, LAYERS = 4, 2
PROBE = [[5, 17, 33, 2, 90, 41, 7, 64, 128, 3, 11], [200, 4, 4, 9, 150, 77]]
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def factor(version: int, megatron_name: str) -> float:
    """The perturbation of a parameter in push ``version``: 1 + k/4096, k in [64v+1, 64v+61], so
    every version's factor differs from every other's for every name (and exactly
    representable in fp32)."""
    return 1.0 + (64 * version + zlib.crc32(megatron_name.encode()) % 61 + 1) / 4096


def _global_name(chunk, local_name: str, pctx, arch) -> str:
    """The converter table's name of a local parameter, worked out here (not by the code under
    test): layer from Megatron's ``layer_number``, expert ``ep_rank * E/EP + local``."""
    m = re.match(r"^decoder\.layers\.(\d+)\.", local_name)
    if m is None:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1
    name = f"decoder.layers.{layer}." + local_name[m.end():]
    per_rank = arch.num_experts // pctx.layout.ep
    return _LOCAL_EXPERT.sub(lambda e: f".mlp.experts.local_experts.{pctx.ep_rank * per_rank + int(e.group(1))}.", name)


def _perturb(chunks, pctx, arch, version: int) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for local_name, p in chunk.named_parameters():
                p.mul_(factor(version, _global_name(chunk, local_name, pctx, arch)))


class DroppingExperts:
    """SIMULATED FAULT: a disk transport that leaves EP rank 1's experts (global experts >= E/2)
    out of what it writes and reports — what a push that never walked that rank's experts sends."""

    def __new__(cls, *args, **kw):
        from megatron_spin.sync.transports import DiskTransport

        class _Dropping(DiskTransport):
            def send(self, bucket):
                kept = [(n, t) for n, t in bucket
                        if not (m := re.search(r"\.experts\.(\d+)\.", n)) or int(m.group(1)) < EXPERTS // 2]
                if kept:
                    super().send(kept)

        return _Dropping(*args, **kw)


def _moe_push_jobs(rank, world_size, url, ckpt, layout, jobs, disk_dir, first_version):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.convert import converter_for
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from megatron_spin.sync.push import SyncError
    from tests.dist.test_weight_sync import Push, _route, logprob_gap

    arch = read_arch(ckpt)
    fleet = RolloutFleet([EngineClient(url, API_KEY)]) if rank == 0 else None
    pctx = init_parallel(layout)
    chunks = build_model(arch, pctx, init_weights=False)
    hf_names = converter_for(arch).hf_names(arch)
    results = []
    for version, (transport, fault) in enumerate(jobs, start=first_version):
        load_model_weights(chunks, ckpt)
        _perturb(chunks, pctx, arch, version)
        target = PushTarget(api_key=API_KEY, disk_dir=disk_dir, route=_route(world_size, 1))
        injected = DroppingExperts(disk_dir) if fault and rank == 0 else None
        sync = Push(SyncConfig(transport=transport, bucket_mb=0.05), target, arch, pctx, fleet, injected)
        out = dict(layout=str(layout), transport=transport, fault=fault, version=version, error=None)
        try:
            out["tensors"] = sync.push(chunks, version).tensors
        except SyncError as exc:
            out["error"] = str(exc)
        if rank == 0:
            client = fleet.slots[0].client
            out["engine_version"] = client.weight_version()
            out["engine"] = {n: torch.tensor(client.get_weights_by_name(n, truncate_size=1 << 20)) for n in hf_names}
        if out["error"] is None:
            out["gap"] = logprob_gap(chunks, pctx, fleet, PROBE)
        sync.close()
        results.append(out)
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_push")
    hf = make_tiny_hf(root / "hf", "qwen3_moe", tied=False, layers=LAYERS, experts=EXPERTS, top_k=2)
    convert_hf_to_megatron(hf, root / "mcore", log=lambda *_: None)
    return hf, root / "mcore"


def _expected(hf, ckpt, version: int) -> dict[str, torch.Tensor]:
    """HF's tensors of the trainer's perturbed weights, through the converter table's names."""
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.convert import converter_for

    arch = read_arch(ckpt)
    original = load_file(hf / "model.safetensors")
    return {h: original[h] * factor(version, p.megatron)
            for p in converter_for(arch).params(arch) for h in p.hf}


def _check_pushed(hf, ckpt, r) -> None:
    want = _expected(hf, ckpt, r["version"])
    assert r["error"] is None, r["error"]
    assert r["tensors"] == len(want) == LAYERS * (8 + 1 + 3 * EXPERTS) + 3  # attention 6 + 2 norms, router, experts
    assert r["engine_version"] == str(r["version"])
    assert r["engine"].keys() == want.keys()
    wrong = [n for n, t in want.items() if not torch.equal(r["engine"][n], t)]
    assert not wrong, f"{r['layout']} {r['transport']}: {len(wrong)} tensors differ, e.g. {wrong[:4]}"
    assert max(r["gap"].values()) <= 1e-4, r["gap"]


def test_moe_push_at_ep2_delivers_every_expert_bit_exactly(moe, tmp_path):
    hf, ckpt = moe
    jobs = [("tensor", False), ("distributed", False), ("disk", False), ("disk", True)]
    with launch_embedded(hf, api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0"]) as engine:
        per_rank = launch(_moe_push_jobs, 2, (engine.url, str(ckpt), ParallelLayout(ep=2), jobs,
                                              str(tmp_path / "weights"), 1), timeout=LAUNCH_TIMEOUT)
    results = per_rank[0]
    for r in results[:3]:
        _check_pushed(hf, ckpt, r)
    # The negative: EP rank 1's experts left out -> SyncError naming them, on every rank.
    dropped = results[3]
    assert all(rr[3]["error"] for rr in per_rank), [rr[3]["error"] for rr in per_rank]
    assert "partial push" in dropped["error"] and f"{LAYERS * 3 * EXPERTS // 2} tensors missing" in dropped["error"]
    assert re.search(r"experts\.[23]\.", dropped["error"]), dropped["error"]
    assert dropped["engine_version"] == "3"  # not advanced


def test_moe_push_at_tp2_ep2_pp2_ep2_and_dp4_ep2(moe, tmp_path):
    hf, ckpt = moe
    jobs = [("tensor", False), ("distributed", False)]
    layouts = [ParallelLayout(tp=2, ep=2), ParallelLayout(pp=2, ep=2), ParallelLayout(ep=2)]
    with launch_embedded(hf, api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0"]) as engine:
        results = []
        for i, layout in enumerate(layouts):
            per_rank = launch(_moe_push_jobs, 4, (engine.url, str(ckpt), layout, jobs, str(tmp_path / "weights"),
                                                  1 + i * len(jobs)), timeout=LAUNCH_TIMEOUT)
            results += per_rank[0]
    assert [r["version"] for r in results] == [1, 2, 3, 4, 5, 6]
    for r in results:
        _check_pushed(hf, ckpt, r)
