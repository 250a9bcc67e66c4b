"""Build Megatron-core GPT models from an HF architecture, for any TP × PP × virtual-PP layout.

    arch = arch_from_hf_dir(hf_dir)
    chunks = build_model(arch, pctx)          # list: one GPTModel per virtual pipeline stage

The layer spec is the TransformerEngine spec where TE and CUDA exist and the local
(pure-PyTorch) spec otherwise; ``platform`` decides, nothing else does.  Validation of the
layout and precision happens before any parameter is allocated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_spin import platform
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.precision import Precision, PrecisionError
from megatron_spin.parallel.groups import ParallelContext
from megatron_spin.models.vocab_padding import mask_padded_vocab
from megatron_spin.parallel.layout import (ParallelLayout, check_moe_layout_for_training, padded_vocab_size,
                                           validate_layout)


def check_precision(precision: Precision, plat: platform.Platform) -> None:
    if precision.fp8 is not None and not plat.has_te:
        raise PrecisionError("fp8", "requested, but TransformerEngine with CUDA is not available on this machine "
                                    f"(device={plat.device}); remove the fp8 settings or run on a GPU with "
                                    "TransformerEngine installed (see the README's GPU section)")


def check_moe_training(arch: ModelArch, layout: ParallelLayout, plat: Optional[platform.Platform] = None) -> None:
    """Refuse to *train* a MoE model at TP > 1 on a platform without sequence parallelism (no TE):
    :func:`megatron_spin.parallel.layout.check_moe_training`."""
    plat = plat or platform.current()
    check_moe_layout_for_training(arch, layout, sequence_parallel=plat.has_te, where=plat.device)


def sequence_multiple(arch: ModelArch, layout: ParallelLayout, precision: Precision,
                      plat: Optional[platform.Platform] = None) -> int:
    """What training sequence lengths are padded to a multiple of: FP8's GEMM alignment, and TP
    where sequence parallelism splits the sequence (MoE at TP > 1 with TE)."""
    plat = plat or platform.current()
    multiple = precision.sequence_multiple
    if arch.is_moe and layout.tp > 1 and plat.has_te:
        multiple = math.lcm(multiple, layout.tp)
    return multiple


def build_transformer_config(
    arch: ModelArch,
    layout: ParallelLayout,
    precision: Precision = Precision(),
    *,
    recompute: bool = False,
    moe_aux_loss_coeff: float = 0.0,
    plat: Optional[platform.Platform] = None,
):
    """The TransformerConfig equal to the HF model's computation (dropout off: RL fine-tuning).
    ``plat``: the platform to build for (default: this process's).  ``moe_aux_loss_coeff``: weight
    of Megatron's load-balancing loss in a MoE model's update (0: no auxiliary loss)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    plat = plat or platform.current()
    validate_layout(arch, layout)
    check_precision(precision, plat)
    fused = plat.is_cuda  # fused kernels exist only on GPU builds
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if (layout.vpp or 1) > 1 else None,
        use_cpu_initialization=True,  # identical full weights at every TP size
        bias_activation_fusion=fused and plat.has_te,
        bias_dropout_fusion=fused,
        # The local spec's fused softmax needs kernels the pip wheel does not ship: ask for it only
        # when they import (with TE, TE's attention does its own softmax).
        masked_softmax_fusion=fused and plat.has_fused_softmax,
        apply_rope_fusion=fused and plat.has_te,
        # Only apex's LayerNorm kernel reads it; the local spec's RMSNorm (torch) refuses it outright.
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        **precision.transformer_config_kwargs(),
    )
    if arch.is_moe:
        kwargs.update(_moe_kwargs(arch, layout, moe_aux_loss_coeff))
        # Megatron trains MoE with TP only under sequence parallelism (its MoE layer refuses
        # otherwise): activations outside attention/MLP are split along the sequence over TP.
        # Only TE's norms support it; without TE a TP>1 MoE model runs forward only
        # (check_moe_training refuses to train it).
        kwargs["sequence_parallel"] = layout.tp > 1 and plat.has_te
    if layout.pp > 1 and not plat.is_cuda:
        # On gloo, batched isend/irecv interleaves wrongly with interleaved PP (DESIGN.md).
        kwargs["batch_p2p_comm"] = False
    return TransformerConfig(**kwargs)


def _moe_kwargs(arch: ModelArch, layout: ParallelLayout, aux_loss_coeff: float) -> dict:
    """Megatron's MoE layer computing what HF's Qwen3-MoE block computes.

    HF: ``p = softmax(router(x))`` in fp32, top-k of p, renormalised over the k when
    ``norm_topk_prob``.  Megatron without pre-softmax takes the top-k *logits* and softmaxes over
    them, which is the same renormalised distribution; with pre-softmax it softmaxes first and
    keeps the raw top-k probabilities (``norm_topk_prob`` false).  The router's GEMM and softmax run
    in fp32 (HF: the GEMM in the model's dtype, the softmax in fp32): identical in fp32; in bf16 a
    near-tie between two experts' scores may pick differently from HF or SGLang.  Tokens reach
    their experts by all-to-all over EP (the dispatcher Megatron recommends; on CPU ranks it runs
    on gloo's all_to_all_single).
    """
    if aux_loss_coeff < 0:
        raise ValueError(f"moe_aux_loss_coeff must be >= 0, got {aux_loss_coeff}")
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_top_k,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        # One linear pair per expert (SequentialMLP): the parameter names the converter table
        # knows on every platform.  Grouped GEMM would be faster on GPUs (see the README).
        moe_grouped_gemm=False,
        expert_model_parallel_size=layout.ep,
    )


def build_layer_spec(plat: Optional[platform.Platform] = None, *, qk_layernorm: bool = False,
                     num_experts: Optional[int] = None):
    """The layer spec; ``qk_layernorm`` adds the per-head query/key RMSNorm (Qwen3);
    ``num_experts`` makes every layer's MLP a MoE layer of that many experts."""
    plat = plat or platform.current()
    from megatron.core.models.gpt import gpt_layer_specs as specs

    moe = dict(num_experts=num_experts or None, moe_grouped_gemm=False)
    if plat.has_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **moe)
    return specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm", **moe)


def build_model(
    arch: ModelArch,
    pctx: ParallelContext,
    precision: Precision = Precision(),
    *,
    recompute: bool = False,
    init_weights: bool = True,
    on_meta: bool = False,
    moe_aux_loss_coeff: float = 0.0,
) -> list:
    """One GPTModel per virtual pipeline stage on this rank, on the platform's device.

    ``init_weights=False`` skips random initialisation (weights come from a checkpoint).
    ``on_meta=True`` builds shapes only (no memory): used to read Megatron's checkpoint layout.

    When TP does not divide the vocabulary, the embedding and output layer get
    ``padded_vocab_size(V, TP)`` rows and the padded logits are masked to -inf
    (``models/vocab_padding.py``); each chunk's ``true_vocab_size`` is ``V``, which
    ``forward_logits`` returns.  Randomly initialised padded rows are zeroed.
    """
    from megatron.core.models.gpt import GPTModel

    plat = platform.prepare_megatron()
    config = build_transformer_config(arch, pctx.layout, precision, recompute=recompute,
                                      moe_aux_loss_coeff=moe_aux_loss_coeff)
    config.perform_initialization = init_weights
    spec = build_layer_spec(plat, qk_layernorm=arch.qk_layernorm, num_experts=arch.num_experts)
    chunks = []
    vpp = pctx.layout.chunks_per_rank
    device = plat.local_device()
    tp = pctx.layout.tp
    vocab = padded_vocab_size(arch.vocab_size, tp)
    for vp_stage in range(vpp):
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=pctx.chunk_is_first(vp_stage),
                post_process=pctx.chunk_is_last(vp_stage),
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=arch.rope_theta,
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                vp_stage=vp_stage if vpp > 1 else None,
            )
        if not init_weights:
            _mark_tensor_parallel_weights(model)
        elif vocab != arch.vocab_size and not on_meta:
            _zero_padded_rows(model, arch.vocab_size, vocab, tp, pctx.tp_rank)
        mask_padded_vocab(model, arch.vocab_size, vocab, tp, pctx.tp_rank)
        model.true_vocab_size = arch.vocab_size
        chunks.append(model if on_meta else model.to(device))
    return chunks


def _zero_padded_rows(model, vocab_size: int, padded: int, tp: int, tp_rank: int) -> None:
    """Zero this rank's rows of vocabulary ids ``>= vocab_size`` (random init drew them).

    They would be harmless (masked, never a label, never an input), but zero is what a loaded
    checkpoint holds and what an export drops, so a fresh model and a loaded one agree.
    """
    per_rank = padded // tp
    keep = max(0, vocab_size - tp_rank * per_rank)
    with torch.no_grad():
        for module in (getattr(model, "embedding", None), getattr(model, "output_layer", None)):
            table = getattr(module, "word_embeddings", module)
            weight = getattr(table, "weight", None)
            if weight is not None and weight.shape[0] == per_rank:
                weight[keep:].zero_()


def _mark_tensor_parallel_weights(model) -> None:
    """Tag TP-sharded weights the way weight initialisation would have.

    Megatron sets ``tensor_model_parallel`` / ``partition_dim`` on a layer's weight only inside
    its init routine, which ``perform_initialization=False`` skips.  Untagged shards count as
    TP duplicates: the grad norm (and so clipping) then sees only TP rank 0's shard.
    """
    from megatron.core import tensor_parallel as tpl

    dims = ((tpl.ColumnParallelLinear, 0), (tpl.RowParallelLinear, 1), (tpl.VocabParallelEmbedding, 0))
    for module in model.modules():
        for cls, dim in dims:
            weight = getattr(module, "weight", None)
            if isinstance(module, cls) and weight is not None and not getattr(weight, "tensor_model_parallel", False):
                tpl.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
