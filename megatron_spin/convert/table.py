"""Converter tables: Megatron parameter name ↔ HF tensor names + a named transform.

One table per architecture (``llama.py``, ``qwen2.py``, ``qwen3.py``) serves every path that moves
weights between the two worlds: the checkpoint tools, the rollout weight sync and the
tests.  Names on the Megatron side are the *local-spec* parameter names with global layer
indices at TP=1 (``decoder.layers.3.self_attention.linear_qkv.weight``) and, for MoE models,
global expert indices at EP=1 (``decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight``);
TE-spec names (layer norms fused into the following linear) are mapped onto them by
:func:`canonical_name`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Optional, Sequence

import torch

from megatron_spin.convert.transforms import Transform
from megatron_spin.spec.arch import ModelArch

# Which dimension of the full (TP=1) tensor Megatron splits across TP ranks; None = replicated.
COLUMN, ROW, REPLICATED = 0, 1, None

_TE_ALIASES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)


def canonical_name(megatron_name: str) -> str:
    """Map a TE-spec parameter name onto the local-spec name the tables use."""
    name = megatron_name.removeprefix("module.")
    for te, local in _TE_ALIASES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


@dataclasses.dataclass(frozen=True)
class Rule:
    megatron: str  # template, may contain {layer} and, after it, {expert}
    hf: tuple[str, ...]
    transform: Transform
    tp_dim: Optional[int]
    when: Callable[[ModelArch], bool] = lambda arch: True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.megatron


@dataclasses.dataclass(frozen=True)
class Param:
    """One concrete Megatron parameter and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    rule: Rule
    layer: Optional[int]
    expert: Optional[int] = None  # global expert index (MoE expert weights only)


class ConverterTable:
    def __init__(self, family: str, rules: Sequence[Rule]):
        self.family = family
        self.rules = tuple(rules)
        self._patterns = [
            (re.compile("^" + re.escape(r.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)")
                        .replace(r"\{expert\}", r"(?P<expert>\d+)") + "$"), r)
            for r in self.rules
        ]

    def params(self, arch: ModelArch) -> Iterator[Param]:
        """Every Megatron parameter of ``arch`` (global layer and expert numbering), in model order."""
        for rule in self.rules:
            if not rule.when(arch):
                continue
            layers = range(arch.num_layers) if rule.per_layer else [None]
            experts = range(arch.num_experts) if rule.per_expert else [None]
            for layer in layers:
                for expert in experts:
                    yield self._param(rule, layer, expert)

    def param(self, megatron_name: str) -> Param:
        name = canonical_name(megatron_name)
        for pattern, rule in self._patterns:
            m = pattern.match(name)
            if m:
                index = {k: int(v) for k, v in m.groupdict().items()}
                return self._param(rule, index.get("layer"), index.get("expert"))
        raise KeyError(f"no {self.family} converter rule for Megatron parameter {megatron_name!r}")

    @staticmethod
    def _param(rule: Rule, layer: Optional[int], expert: Optional[int] = None) -> Param:
        fmt = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
        return Param(rule.megatron.format(**fmt), tuple(h.format(**fmt) for h in rule.hf), rule, layer, expert)

    def hf_names(self, arch: ModelArch) -> list[str]:
        return [h for p in self.params(arch) for h in p.hf]

    def to_megatron(
        self, arch: ModelArch, param: Param, read_hf: Callable[[str], torch.Tensor]
    ) -> torch.Tensor:
        """The full (TP=1) Megatron tensor for ``param``, reading HF tensors by name."""
        return param.rule.transform.to_megatron(arch, [read_hf(h) for h in param.hf])

    def merge_tp_shards(self, param: Param, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full (TP=1) tensor from the TP ranks' shards of a live model, in rank order."""
        dim = param.rule.tp_dim
        if dim is None or len(shards) == 1:
            return shards[0]
        blocks = param.rule.transform.tp_blocks
        if blocks == 1:
            return torch.cat(list(shards), dim=dim)
        per_rank = [torch.chunk(s, blocks, dim=dim) for s in shards]  # [rank][block]
        return torch.cat([per_rank[r][b] for b in range(blocks) for r in range(len(shards))], dim=dim)

    @staticmethod
    def full_shape(param: Param, shard_shape: Sequence[int], tp: int) -> tuple[int, ...]:
        """The shape :meth:`merge_tp_shards` gives for TP shards of ``shard_shape``."""
        shape = list(shard_shape)
        if param.rule.tp_dim is not None and tp > 1:
            shape[param.rule.tp_dim] *= tp
        return tuple(shape)

    def to_hf(self, arch: ModelArch, param: Param, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF tensors (by name) for a full (TP=1) Megatron tensor."""
        parts = param.rule.transform.to_hf(arch, tensor)
        return dict(zip(param.hf, parts, strict=True))
