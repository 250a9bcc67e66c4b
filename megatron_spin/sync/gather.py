"""Live Megatron shards → full HF tensors, one parameter at a time, through the converter table.

On each pipeline stage of data-parallel replica 0, the TP ranks walk their model chunks'
parameters in the same order; for each one they all-gather the TP shards (the only
collective), TP rank 0 merges them into the full TP=1 tensor (``ConverterTable.merge_tp_shards``),
renames the local layer index to the global one (``layer_number`` already counts PP and
virtual-PP offsets) and converts it to HF tensors with the *same* table the checkpoint tools
use.  Only the tensor in flight is ever materialised: peak extra memory is one full
parameter (on TP rank 0) plus one shard per TP rank.

:func:`iter_hf_weights` — the *stage* push (disk and distributed transports): each stage
yields only its own layers and the pusher of every stage sends them itself, so no stage holds
another's weights.

:func:`iter_full_hf_weights` — the *feed* push (tensor transport, by device locality): a rank
that feeds an engine needs every tensor of the model on its own device.  The stages first agree
on the global parameter list (one object all-gather along the pipeline); then, parameter by
parameter in that order, the owning stage's TP ranks all-gather and merge it, and it is
broadcast along each pipeline group to the other stages.  Every rank of a data-parallel replica
that holds a feeder takes part in every collective; only feeders convert and yield.

**Experts (MoE) under expert parallelism.**  A layer's experts are split over the EP ranks of
its EP group — data-parallel ranks of the dense layers at the same TP rank and stage — rank
``r`` holding global experts ``r * E/EP ... (r+1) * E/EP - 1`` under the same local indices, so
a replica alone holds only ``E/EP`` experts of each layer.  Every EP rank walks its parameters
in the same local order; at an expert parameter (local expert ``l``) the walk becomes ``EP``
steps, one per EP rank ``r`` in rank order: ``r`` broadcasts its shard over the EP group (equal
shapes on every EP rank), and the tensor continues as the parameter of global expert
``r * E/EP + l`` (TP gather, merge, conversion, PP broadcast).  One expert's shard is in flight
at a time.  So every EP peer of a walking rank must walk too: in the stage push a rank of
another replica *lends* its experts (``experts_only``: it takes part in the broadcasts only);
in the feed push every replica of an EP group with a feeder walks.  Dense parameters, and every
model at EP=1, go exactly as described above.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_spin.convert import converter_for
from megatron_spin.convert.table import canonical_name
from megatron_spin.spec.arch import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


def global_name(chunk, local_name: str) -> str:
    """``decoder.layers.<local i>.x`` → ``decoder.layers.<global i>.x`` (canonical local-spec name);
    a MoE expert's ``local_experts.<local e>`` → ``local_experts.<global e>`` (its EP rank's offset)."""
    name = canonical_name(local_name)
    m = _LAYER.match(name)
    if m is None:
        return name
    layer = chunk.decoder.layers[int(m.group(1))]
    rest = name[m.end():]
    e = _EXPERT.match(rest)
    if e is not None:
        expert = layer.mlp.local_expert_indices[int(e.group(1))]
        rest = f"mlp.experts.local_experts.{expert}." + rest[e.end():]
    return f"decoder.layers.{layer.layer_number - 1}." + rest


def stage_parameters(modules: list, arch: ModelArch) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global Megatron name, local shard) of this rank's parameters, in model order.

    A tied model's last stage keeps a copy of the word embeddings as its output layer; HF has
    no such tensor, the first stage sends the embeddings.
    """
    for chunk in modules:
        for local_name, p in chunk.named_parameters():
            name = global_name(chunk, local_name)
            if arch.tie_word_embeddings and name.startswith("output_layer."):
                continue
            yield name, p


def iter_hf_weights(modules: list, arch: ModelArch, pctx, dtype: Optional[torch.dtype] = None, *,
                    experts_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) for this stage's parameters, every expert of every layer included;
    yields on TP rank 0 only.

    Every TP rank of the stage, and under EP every rank of their EP groups, must exhaust the
    iterator (the TP all-gathers and EP broadcasts are collective).  ``experts_only``: this rank
    lends its experts to an EP peer's walk (broadcasts only) and yields nothing.  ``dtype`` casts
    before the gather (e.g. to the engine's bf16: half the bytes on the wire).
    """
    table = converter_for(arch)
    failure: Optional[Exception] = None
    for name, p in stage_parameters(modules, arch):
        param = table.param(name)
        if experts_only and param.expert is None:
            continue
        shard = p.detach() if dtype is None else p.detach().to(dtype)
        for source, source_shard in _expert_sources(table, arch, param, shard, pctx):
            if experts_only:
                continue
            shards = _tp_shards(source, source_shard, pctx)
            if pctx.tp_rank != 0 or failure is not None:
                continue
            full = table.merge_tp_shards(source, shards)
            del shards
            try:  # raised after the walk: a TP or EP peer would wait in the next collective otherwise
                converted = table.to_hf(arch, source, full)
            except (KeyError, ValueError, RuntimeError) as exc:
                failure = exc
            else:
                yield from converted.items()
    if failure is not None:
        raise failure


def ep_source_params(table, arch: ModelArch, param, pctx) -> list:
    """The parameters the EP ranks hold in ``param``'s local slot, in EP rank order: ``[param]`` for
    a dense parameter or at EP=1; for local expert ``l``, global experts ``r * E/EP + l``."""
    ep = pctx.layout.ep
    if param.expert is None or ep == 1:
        return [param]
    per_rank = arch.num_experts // ep
    local = param.expert - pctx.ep_rank * per_rank
    if not 0 <= local < per_rank:  # Megatron's offset is ep_rank * E/EP; anything else is a bug here
        raise ValueError(f"{param.megatron}: expert {param.expert} is not one of EP rank {pctx.ep_rank}'s "
                         f"{per_rank} experts")
    prefix, _, rest = param.megatron.partition(f"local_experts.{param.expert}.")
    return [table.param(f"{prefix}local_experts.{r * per_rank + local}.{rest}") for r in range(ep)]


def _expert_sources(table, arch: ModelArch, param, shard: torch.Tensor, pctx
                    ) -> Iterator[tuple[object, torch.Tensor]]:
    """(parameter, its shard on this TP rank) for every EP rank's ``param`` slot, in EP rank order:
    EP rank ``r``'s shard reaches every EP rank by a broadcast from ``r`` (collective over the EP
    group; one expert at a time).  A dense parameter is yielded as it is, with no collective."""
    sources = ep_source_params(table, arch, param, pctx)
    if len(sources) == 1:
        yield param, shard
        return
    for r, source in enumerate(sources):
        yield source, _from_ep_rank(shard, r, pctx)


def _from_ep_rank(shard: torch.Tensor, r: int, pctx) -> torch.Tensor:
    """EP rank ``r``'s tensor of the shape of ``shard`` (this rank's own when it is ``r``), by a
    broadcast over the EP group (collective).  The EP group's rank ``r`` is EP rank ``r``."""
    buf = shard.contiguous() if r == pctx.ep_rank else torch.empty_like(shard)
    dist.broadcast(buf, src=dist.get_global_rank(pctx.ep_group, r), group=pctx.ep_group)
    return buf


def _tp_shards(param, shard: torch.Tensor, pctx) -> list[torch.Tensor]:
    """Every TP rank's shard of ``param`` in TP order (collective over the TP group), or just this
    one when ``param`` is not split."""
    if pctx.layout.tp > 1 and param.rule.tp_dim is not None:
        shards = [torch.empty_like(shard) for _ in range(pctx.layout.tp)]
        dist.all_gather(shards, shard.contiguous(), group=pctx.tp_group)
        return shards
    return [shard]


def _merged(table, param, shard: torch.Tensor, pctx) -> torch.Tensor:
    """The full TP=1 tensor of ``param`` from this rank's shard (collective over the TP group)."""
    shards = _tp_shards(param, shard, pctx)
    return shards[0] if len(shards) == 1 else table.merge_tp_shards(param, shards)


def iter_full_hf_weights(modules: list, arch: ModelArch, pctx, dtype: Optional[torch.dtype], *,
                         replica_feeds: bool, feeder: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, on every feeder rank, one parameter at a time (see module doc).

    ``replica_feeds``: this rank's data-parallel replica holds a feeder (all its ranks must walk);
    ``feeder``: this rank feeds an engine (it converts and yields).  Every rank of such a replica
    must exhaust the iterator: the gathers and broadcasts are collective.
    """
    if not replica_feeds:
        return
    table = converter_for(arch)
    mine = [(name, p) for name, p in stage_parameters(modules, arch)]
    device = mine[0][1].device if mine else torch.device("cpu")
    dtype_of = (lambda p: dtype) if dtype is not None else (lambda p: p.dtype)
    # Every stage's (name, full TP=1 shape, dtype, local name, EP source rank), in stage order: the
    # order all ranks walk.  An expert slot is EP entries, one per EP rank's expert (the same list
    # on every EP rank); a dense parameter one entry with no EP source.
    local = []
    for name, p in mine:
        param = table.param(name)
        shape = tuple(table.full_shape(param, tuple(p.shape), pctx.layout.tp))
        sources = ep_source_params(table, arch, param, pctx)
        local += [(s.megatron, shape, dtype_of(p), name, r if len(sources) > 1 else None)
                  for r, s in enumerate(sources)]
    stages: list = [None] * pctx.layout.pp
    if pctx.layout.pp > 1:
        dist.all_gather_object(stages, local, group=pctx.pp_group)
    else:
        stages = [local]
    own = dict(mine)
    failure: Optional[Exception] = None
    for stage, params in enumerate(stages):
        for name, shape, pdtype, local_name, ep_source in params:
            param = table.param(name)
            if stage == pctx.pp_rank:
                shard = own[local_name].detach()
                shard = shard if dtype is None else shard.to(dtype)
                if ep_source is not None:  # EP rank ep_source's expert, on every EP rank
                    shard = _from_ep_rank(shard, ep_source, pctx)
                full = _merged(table, param, shard, pctx)
            else:
                full = torch.empty(shape, dtype=pdtype, device=device)
            if pctx.layout.pp > 1:
                # The owning stage's rank of this pipeline group sends; pp_group ranks are in stage order.
                src = dist.get_global_rank(pctx.pp_group, stage)
                dist.broadcast(full, src=src, group=pctx.pp_group)
            if feeder and failure is None:
                # A conversion error must not end the walk here: the peers' next gather or
                # broadcast would wait for this rank.  It is raised once every collective is done.
                try:
                    converted = table.to_hf(arch, param, full)
                except (KeyError, ValueError, RuntimeError) as exc:
                    failure = exc
                else:
                    yield from converted.items()
            del full
    if failure is not None:
        raise failure
