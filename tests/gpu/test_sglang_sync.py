"""GPU tier: weight pushes into a real SGLang server, checked by log-probs as on the CPU tier.

Runs the jobs of ``tests/dist/test_weight_sync.py`` against ``python -m sglang.launch_server``
with a tiny **bf16** model of head_dim 64 (SGLang's default attention backend on Hopper, FA3,
takes fp16/bf16 only).  One GPU: the engine shares GPU 0 with the trainer rank, so the tensor
transport feeds it by CUDA IPC from that GPU and the disk transport writes shards; the
distributed transport would put both on one GPU in one NCCL group, which NCCL refuses — it runs
with the engine on a second GPU when there is one.  Skipped without CUDA and the ``sglang``
package.  UNVERIFIED: no GPU has run this file; the tolerances are estimates (bf16 engine vs an
fp32 trainer).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.rollout.launcher import bound_socket, launch_sglang
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf
from tests.dist.test_weight_sync import API_KEY, _sync_jobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
                       reason="needs CUDA and sglang (pip install .[sglang])"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    hf = [make_tiny_hf(root / f"hf{s}", "llama", layers=4, seed=s, hidden_size=256, dtype=torch.bfloat16)
          for s in (0, 1)]
    mcore = []
    for s in (0, 1):
        convert_hf_to_megatron(hf[s], root / f"mcore{s}", log=lambda *_: None)
        mcore.append(root / f"mcore{s}")
    return root, hf, mcore


def _serve(hf, tmp_path, gpu: int):
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()  # SGLang binds by port number (a small race, acceptable in a test)
    return launch_sglang(str(hf), port=port, log_path=tmp_path / f"sglang-{gpu}.log", tp_size=1,
                         mem_fraction_static=0.3, api_key=API_KEY, dtype="bfloat16", visible_devices=(str(gpu),))


def _check(results):
    for r in results:
        assert min(r["before"].values()) > 0.5, r  # two random models: far apart
        assert max(r["after"].values()) <= 0.1, r  # bf16 kernels vs the fp32 trainer
        assert r["sample_gap"] <= 0.1, r
        assert r["versions"] == {r["version"]}, r


def test_sglang_on_the_trainers_gpu_takes_tensor_and_disk_pushes(models, tmp_path):
    root, hf, mcore = models
    server = _serve(hf[0], tmp_path, gpu=0)
    jobs = [(ParallelLayout(), "tensor", mcore[1], 64 * 1024, "bfloat16"),
            (ParallelLayout(), "disk", mcore[0], 128 * 1024, "bfloat16")]
    try:
        (results,) = launch(_sync_jobs, 1, ([server.url], jobs, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)
    finally:
        server.stop()
    _check(results)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the distributed transport needs the engine on another GPU")
def test_sglang_on_another_gpu_takes_a_distributed_push(models, tmp_path):
    root, hf, mcore = models
    server = _serve(hf[0], tmp_path, gpu=1)
    jobs = [(ParallelLayout(), "distributed", mcore[1], 64 * 1024, "bfloat16")]
    try:
        (results,) = launch(_sync_jobs, 1, ([server.url], jobs, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)
    finally:
        server.stop()
    _check(results)
