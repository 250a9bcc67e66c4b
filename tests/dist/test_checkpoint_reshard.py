"""A Megatron checkpoint saved at one layout loads at another: TP2 → PP2 → TP1.

Each hop loads the previous checkpoint, runs a forward and saves again; the logits agree
across hops and the stored weights are bit-identical, whatever layout wrote them.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.convert.parity import sample_batch
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


def _hop(rank, world_size, arch, layout, src, dst, input_ids):
    """Load ``src`` (or random-init when None) at ``layout``, forward, save to ``dst``."""
    from megatron_spin.ckpt.model_io import load_model_weights, save_model_weights
    from megatron_spin.models.builder import build_model
    from megatron_spin.models.forward import forward_logits
    from megatron_spin.parallel.groups import init_parallel

    pctx = init_parallel(layout, seed=7)
    chunks = build_model(arch, pctx, init_weights=src is None)
    if src is not None:
        load_model_weights(chunks, src)
    logits = forward_logits(chunks, pctx, input_ids)
    save_model_weights(chunks, dst)
    return logits if (logits is not None and pctx.tp_rank == 0) else None


def _read_all(rank, world_size, arch, ckpts):
    """Every stored weight (full TP=1 tensors) of each checkpoint."""
    from megatron_spin.convert.streaming import iter_megatron_checkpoint
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel

    destroy_parallel()
    pctx = init_parallel(ParallelLayout())
    return [{p.megatron: t.clone() for p, t in iter_megatron_checkpoint(arch, pctx, c)} for c in ckpts]


def _hop_then_read_all(rank, world_size, arch, layout, src, dst, input_ids, ckpts):
    """A hop, then a read of every checkpoint (``dst`` included, written and closed by then) by
    the hop's own ranks (each reads locally, at TP=1): one launch, one process start-up less."""
    return _hop(rank, world_size, arch, layout, src, dst, input_ids), _read_all(rank, world_size, arch, ckpts)


def _logits(results):
    (out,) = [r for r in results if r is not None]
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_tp2_load_pp2_load_tp1(tmp_path, tied):
    from megatron_spin.spec.arch import arch_from_hf_dir

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", tied=tied, layers=2)
    arch = arch_from_hf_dir(hf)
    ids = sample_batch(arch.vocab_size, seed=1)
    a, b, c = (str(tmp_path / n) for n in ("tp2", "pp2", "tp1"))
    # TP2 starts from random megatron init (not a converted model): the saved layout is TP2's own.
    la = _logits(launch(_hop, 2, (arch, ParallelLayout(2, 1), None, a, ids), timeout=LAUNCH_TIMEOUT))
    lb = _logits(launch(_hop, 2, (arch, ParallelLayout(1, 2), a, b, ids), timeout=LAUNCH_TIMEOUT))
    ((lc, (wa, wb, wc)),) = launch(_hop_then_read_all, 1, (arch, ParallelLayout(1, 1), b, c, ids, [a, b, c]),
                                   timeout=LAUNCH_TIMEOUT)
    assert (la - lb).abs().max().item() <= 1e-5
    assert torch.equal(lb, lc)  # neither splits a matmul: identical arithmetic
    assert wa.keys() == wb.keys() == wc.keys() and len(wa) > 0
    for name in wa:
        assert torch.equal(wa[name], wb[name]) and torch.equal(wb[name], wc[name]), name


def test_converted_checkpoint_loads_and_resaves_at_tp2(tmp_path):
    """A converted (streamed) checkpoint and one Megatron saved from it hold the same weights."""
    from megatron_spin.spec.arch import arch_from_hf_dir

    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=False)
    arch = arch_from_hf_dir(hf)
    convert_hf_to_megatron(hf, tmp_path / "conv", log=lambda *_: None)
    ids = sample_batch(arch.vocab_size, seed=2)
    conv, saved = str(tmp_path / "conv"), str(tmp_path / "saved")
    _, (w1, w2) = launch(_hop_then_read_all, 2, (arch, ParallelLayout(2, 1), conv, saved, ids, [conv, saved]),
                         timeout=LAUNCH_TIMEOUT)[0]
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
