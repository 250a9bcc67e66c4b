"""A vocabulary that TP does not divide: 32,000 tokens plus one added special token (32,001).

The Megatron model pads the embedding and output layer to ``padded_vocab_size(32001, TP)``
(32,256 rows at TP=2 and TP=4), masks the padded logits to -inf and the converter table drops
the padded rows on the way out.  Tiny models otherwise (hidden 32, 2 layers, 4 heads — MHA so
that TP=4 divides the KV heads), Llama untied and Qwen2 tied.  One 4-rank launch covers, at
TP=2 and TP=4 (DP over the spare ranks):

  * logits on the real rows equal HF's (fp32, <= 1e-5), with the added token among the inputs;
  * the train path's vocab-parallel response log-probs equal HF's log_softmax;
  * the padded rows load as zeros (and are zeroed after random initialisation), and stay exactly
    zero through Adam updates with weight decay;
  * HF -> Megatron -> (a checkpoint saved at TP, stored padded) -> HF is bit-exact, and the live
    gather the weight push uses yields HF's tensors bit-exactly, in their true shape.

A second, 2-rank launch pushes the odd-vocabulary actor (TP=2) into a real embedded engine over
both tensor and distributed transports: the engine refuses any shape but its own, and after the
push its log-probs agree with the trainer's.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_spin.convert.parity import hf_logits
from megatron_spin.convert.pipeline import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_spin.ckpt.safe_load import read_dcp_metadata
from megatron_spin.pairs import PreferencePair, collate_pairs
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout, padded_vocab_size
from megatron_spin.rollout.launcher import launch_embedded
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

VOCAB = 32001  # 32,000 + one added special token: odd, so no TP > 1 divides it
ADDED = VOCAB - 1
TPS = (2, 4)
MODELS = {"llama-untied": ("llama", False), "qwen2-tied": ("qwen2", True)}
TABLES = ("word_embeddings.weight", "output_layer.weight")
LOGIT_TOL = 1e-5  # fp32
PUSHED = ("llama-untied", 2)  # its trained weights are pushed to an engine holding the original


def _ids() -> torch.Tensor:
    """[2, 12] random ids over the whole vocabulary, the added token and its neighbour included."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3], ids[1, 0], ids[1, 7] = ADDED, ADDED, ADDED - 1
    return ids


def _pairs() -> list[PreferencePair]:
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [PreferencePair("a", rand(5), rand(3) + [ADDED], [ADDED] + rand(4), 1.0, 0.0, None),
            PreferencePair("b", rand(4) + [ADDED], rand(5), rand(2), 1.0, 0.0, None)]


def _padded_rows(chunks, arch, pctx) -> dict:
    """{table: (padded rows on this rank, max |w| over them, sum of the real rows)}."""
    per_rank = padded_vocab_size(arch.vocab_size, pctx.layout.tp) // pctx.layout.tp
    keep = max(0, arch.vocab_size - pctx.tp_rank * per_rank)
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            table = next((t for t in TABLES if name.endswith(t)), None)
            if table is not None:
                w = p.detach()
                assert w.shape[0] == per_rank, (name, tuple(w.shape), per_rank)
                pad = w[keep:]
                out[table] = (pad.shape[0], float(pad.abs().max()) if pad.numel() else 0.0,
                              float(w[:keep].double().sum()))
    return out


def _odd_vocab_jobs(rank, world_size, ckpts, ids, batch, out_root):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights, publish_model_checkpoint
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.models.builder import build_model
    from megatron_spin.models.forward import forward_logits
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.sync.gather import iter_hf_weights
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.train.reference import Reference
    from megatron_spin.train.step import forward_logps

    out = {}
    for name, ckpt in ckpts.items():
        arch = read_arch(ckpt)
        for tp in TPS:
            pctx = init_parallel(ParallelLayout(tp=tp))
            chunks = build_model(arch, pctx, init_weights=False)
            load_model_weights(chunks, ckpt)
            rows = _padded_rows(chunks, arch, pctx)
            fresh = _padded_rows(build_model(arch, pctx), arch, pctx)  # randomly initialised
            logits = forward_logits(chunks, pctx, ids)
            logps = forward_logps(chunks, batch.split_micro_batches(batch.num_pairs))
            gathered = {k: v.clone() for k, v in iter_hf_weights(chunks, arch, pctx)}
            publish_model_checkpoint(chunks, f"{out_root}/{name}-tp{tp}", source_dir=ckpt)
            # Adam with weight decay at this layout: padded rows must not move.
            actor = Actor.build(arch, pctx, OptimConfig(lr=1e-2, weight_decay=0.1), LossConfig(beta=0.5),
                                init_from=ckpt)
            ref = Reference.build(arch, pctx, init_from=ckpt)
            mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, 1), pctx.dp_rank, pctx.dp_size)
            ref_logps = ref.logps(mbs)
            losses = [actor.train_step(mbs, ref_logps)["loss"] for _ in range(2)]
            trained = _padded_rows(actor.modules, arch, pctx)
            # Through the DDP wrapper (as the push probe calls it) the logits are cut to V too.
            wrapped = forward_logits(actor.modules, pctx, ids)
            if (name, tp) == PUSHED:  # a model the engine does not hold yet, for the push test
                publish_model_checkpoint(actor.modules, f"{out_root}/{name}-tp{tp}-trained", source_dir=ckpt)
            one = pctx.tp_rank == 0 and pctx.dp_rank == 0  # big results: one copy comes back
            out[(name, tp)] = dict(tp_rank=pctx.tp_rank, dp_rank=pctx.dp_rank, rows=rows, trained=trained, fresh=fresh,
                                   logits=logits if one else None, logps=logps if one else None,
                                   gathered=gathered if one else None, losses=losses,
                                   wrapped_shape=tuple(wrapped.shape) if one else None)
            destroy_parallel()
    return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_vocab")
    hf, ckpts = {}, {}
    for name, (family, tied) in MODELS.items():
        hf[name] = make_tiny_hf(root / f"{name}-hf", family, tied, layers=2, hidden_size=32, vocab_size=VOCAB,
                                kv_heads=4)
        ckpts[name] = str(root / f"{name}-mcore")
        convert_hf_to_megatron(hf[name], ckpts[name], log=lambda *_: None)
    batch = collate_pairs(_pairs(), pad_id=0)
    per_rank = launch(_odd_vocab_jobs, 4, (ckpts, _ids(), batch, str(root / "saved")), timeout=LAUNCH_TIMEOUT)
    return root, hf, batch, per_rank, ckpts


def _first(per_rank, key, field):
    """``field`` from TP rank 0 of DP replica 0 (the one copy the forward / gather returns)."""
    return next(r[key][field] for r in per_rank if r[key]["tp_rank"] == 0 and r[key]["dp_rank"] == 0)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_logits_on_the_real_rows_equal_hf(odd, model, tp):
    root, hf, _, per_rank, _ = odd
    ids = _ids()
    got = _first(per_rank, (model, tp), "logits")
    ref = hf_logits(hf[model], ids)
    assert got.shape == ref.shape == (2, 12, VOCAB)  # padded columns cut off
    assert (got - ref).abs().max().item() <= LOGIT_TOL
    # And so the next-token distributions over the true vocabulary agree.
    diff = (torch.log_softmax(got, -1) - torch.log_softmax(ref, -1)).abs().max().item()
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_train_path_logprobs_equal_hf_log_softmax(odd, model, tp):
    """Megatron's vocab-parallel cross entropy over the padded shards gives HF's log-probs:
    unmasked zero-logit padding would shift each token by ~log(1 + 255/32001) ~ 8e-3."""
    root, hf, batch, per_rank, _ = odd
    ref = torch.log_softmax(hf_logits(hf[model], batch.tokens).double(), dim=-1)
    labels = batch.tokens[:, 1:]
    token_ref = ref[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [n, S-1]
    mask = batch.loss_mask[:, :-1].bool()
    expected = torch.where(mask, token_ref, 0.0).sum(-1)
    (got,) = _first(per_rank, (model, tp), "logps")  # one micro-batch holding every sequence
    assert mask.sum() > 0 and (labels[mask] == ADDED).any()  # the added token is scored
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_padded_rows_load_as_zero_and_never_move(odd, model, tp):
    root, hf, _, per_rank, _ = odd
    padded = padded_vocab_size(VOCAB, tp)
    tables = ("word_embeddings.weight",) if MODELS[model][1] else TABLES
    for table in tables:
        # Over the TP ranks of one replica: exactly padded - V rows, all zero, before and after.
        replica = [r[(model, tp)] for r in per_rank if r[(model, tp)]["dp_rank"] == 0]
        assert sum(r["rows"][table][0] for r in replica) == padded - VOCAB
        assert all(r["rows"][table][1] == 0.0 and r["trained"][table][1] == 0.0 for r in replica), table
        assert all(r["fresh"][table][1] == 0.0 and r["fresh"][table][2] != 0.0 for r in replica), table
        # The real rows did train (the check is not vacuous).
        assert any(r["rows"][table][2] != r["trained"][table][2] for r in replica), table
    losses = _first(per_rank, (model, tp), "losses")
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert _first(per_rank, (model, tp), "wrapped_shape") == (2, 12, VOCAB)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_round_trip_through_a_padded_checkpoint_is_bit_exact(odd, model, tp, tmp_path):
    root, hf, _, per_rank, _ = odd
    saved = root / "saved" / f"{model}-tp{tp}"
    stored = read_dcp_metadata(saved).state_dict_metadata["embedding.word_embeddings.weight"].size
    assert tuple(stored) == (padded_vocab_size(VOCAB, tp), 32)  # the checkpoint holds the padding
    convert_megatron_to_hf(saved, tmp_path / "back", log=lambda *_: None)
    want = load_file(hf[model] / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == want.keys()
    for name, t in want.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name
    # The live gather (the weight push's first step) yields the same tensors, true shape.
    gathered = _first(per_rank, (model, tp), "gathered")
    assert gathered.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(gathered[name].view(torch.uint8), t.view(torch.uint8)), name


def _logits_at(rank, world_size, ckpt_dirs, layout, ids):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.models.builder import build_model
    from megatron_spin.models.forward import forward_logits
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel

    out = []
    for ckpt in ckpt_dirs:
        pctx = init_parallel(layout)
        chunks = build_model(read_arch(ckpt), pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        out.append(forward_logits(chunks, pctx, ids))
        destroy_parallel()
    return out


def test_a_padded_checkpoint_loads_into_an_unpadded_model(odd):
    """Resharding across paddings: checkpoints written at TP=2 and TP=4 (32256 rows) load at TP=1
    (32001 rows, no padding: Megatron's vocabulary tables allow the shape mismatch and read the
    overlap) and compute HF's logits."""
    root, hf, _, _, _ = odd
    ids = _ids()
    dirs = [str(root / "saved" / f"{model}-tp{tp}") for model in MODELS for tp in TPS if tp > 1]
    (got,) = launch(_logits_at, 1, (dirs, ParallelLayout(tp=1), ids), timeout=LAUNCH_TIMEOUT)
    for (model, tp), logits in zip([(m, t) for m in MODELS for t in TPS if t > 1], got):
        assert logits.shape == (2, 12, VOCAB)
        assert (logits - hf_logits(hf[model], ids)).abs().max().item() <= LOGIT_TOL, (model, tp)


# --------------------------------------------------------------------------------------------- push

PROBE = [[5, ADDED, 17, ADDED - 1, 2, 90, 31000], [ADDED, 4, 4, 9, 15000, 77, ADDED]]


def _push_jobs(rank, world_size, url, jobs, disk_dir):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from tests.dist.test_weight_sync import API_KEY, Push, _route, logprob_gap

    fleet = RolloutFleet([EngineClient(url, API_KEY)]) if rank == 0 else None
    results = []
    for version, (transport, ckpt) in enumerate(jobs, start=1):
        pctx = init_parallel(ParallelLayout(tp=2))
        arch = read_arch(ckpt)
        chunks = build_model(arch, pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        target = PushTarget(api_key=API_KEY, disk_dir=disk_dir, route=_route(world_size, 1))
        sync = Push(SyncConfig(transport=transport, bucket_mb=1.0), target, arch, pctx, fleet)
        before = logprob_gap(chunks, pctx, fleet, PROBE)
        report = sync.push(chunks, version)
        after = logprob_gap(chunks, pctx, fleet, PROBE)
        results.append(dict(transport=transport, before=before, after=after, tensors=report.tensors))
        sync.close()
        destroy_parallel()
    return results


def test_push_of_an_odd_vocabulary_actor_reaches_the_engine_in_its_true_shape(odd, tmp_path):
    from tests.dist.test_weight_sync import API_KEY

    root, hf, _, _, ckpts = odd
    model, tp = PUSHED
    trained = str(root / "saved" / f"{model}-tp{tp}-trained")
    # The engine starts from the original model; each push changes its weights (trained, then back).
    jobs = [("tensor", trained), ("distributed", ckpts[model])]
    with launch_embedded(hf[model], api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0"]) as engine:
        results = launch(_push_jobs, 2, (engine.url, jobs, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)[0]
    for r in results:
        assert r["tensors"] == 2 * 9 + 3, r
        assert min(r["before"].values()) > 1e-2, r  # the push had something to change
        assert max(r["after"].values()) <= 1e-4, r  # same tolerance as test_weight_sync
