"""Config validation: OptimConfig, BatchConfig (megatron_spin.train.config) and LossConfig
(megatron_spin.loss.config).

Every rule raises ConfigError (a ValueError) whose ``key`` is the offending field, relative to
the record (the loader anchors it to the full dotted key, see test_run_config.py), and whose
message is ``"<key>: <rule>"`` naming the bad value, so a user can find the line of the config
file to fix. Valid boundary values construct fine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest

from megatron_spin.errors import ConfigError
from megatron_spin.loss.config import LossConfig
from megatron_spin.train.config import BatchConfig, OptimConfig


@contextlib.contextmanager
def _raises(key: str, *parts: str):
    """pytest.raises(ConfigError) keyed ``key`` (message ``"<key>: ..."``) whose message holds every
    one of ``parts`` literally."""
    with pytest.raises(ConfigError) as info:
        yield info
    msg = str(info.value)
    assert info.value.key == key, msg
    assert msg.startswith(f"{key}: "), msg
    for part in parts:
        assert part in msg, (part, msg)


# ------------------------------------------------------------------------------------ defaults


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_construct():
    optim, batch, loss = OptimConfig(), BatchConfig(), LossConfig()
    assert optim.optimizer == "adam" and optim.lr_decay_style == "constant"
    assert optim.lr > 0 and 0 <= optim.min_lr <= optim.lr and optim.clip_grad >= 0
    assert optim.lr_decay_steps >= max(1, optim.lr_warmup_steps)
    assert (batch.global_pairs, batch.micro_pairs) == (8, 1)
    assert loss.loss_type == "sigmoid" and loss.beta == 0.1
    assert loss.label_smoothing == 0.0 and loss.simpo_gamma == 0.0 and loss.nll_weight == 0.0


@pytest.mark.parametrize("cfg", [OptimConfig(), BatchConfig(), LossConfig()])
def test_configs_are_frozen(cfg):
    field = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, getattr(cfg, field))


# --------------------------------------------------------------------------------- OptimConfig


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizer_valid(optimizer):
    assert OptimConfig(optimizer=optimizer).optimizer == optimizer


@pytest.mark.parametrize("optimizer", ["adamw", "Adam", "", "lamb"])
def test_optimizer_invalid(optimizer):
    with _raises("optimizer", "one of adam, sgd", f"got {optimizer!r}"):
        OptimConfig(optimizer=optimizer)


@pytest.mark.parametrize("style", ["constant", "cosine", "linear"])
def test_lr_decay_style_valid(style):
    assert OptimConfig(lr_decay_style=style, lr_warmup_steps=2, lr_decay_steps=10).lr_decay_style == style


@pytest.mark.parametrize("style", ["exponential", "inverse-square-root", "Cosine", ""])
def test_lr_decay_style_invalid(style):
    with _raises("lr_decay_style", "one of constant, cosine, linear", f"got {style!r}"):
        OptimConfig(lr_decay_style=style)


@pytest.mark.parametrize("lr, min_lr", [(1e-6, 0.0), (1e-3, 1e-4), (1e-3, 1e-3)])
def test_lr_min_lr_valid(lr, min_lr):
    cfg = OptimConfig(lr=lr, min_lr=min_lr)
    assert (cfg.lr, cfg.min_lr) == (lr, min_lr)


@pytest.mark.parametrize(
    "lr, min_lr, key",
    [
        (0.0, 0.0, "lr"),  # lr must be > 0
        (-1e-3, 0.0, "lr"),
        (1e-3, -1e-5, "min_lr"),  # min_lr must be >= 0
        (1e-3, 2e-3, "min_lr"),  # min_lr must be <= lr
        (1e-6, 1e-6 * (1 + 1e-9), "min_lr"),
    ],
)
def test_lr_min_lr_invalid(lr, min_lr, key):
    # The rule 0 <= min_lr <= lr, lr > 0: the message names the broken half and the bad value.
    rule = "must be > 0" if key == "lr" else f"must be in [0, lr={lr}]"
    with _raises(key, rule, f"got {lr if key == 'lr' else min_lr}"):
        OptimConfig(lr=lr, min_lr=min_lr)


@pytest.mark.parametrize("warmup, decay", [(0, 1), (0, 100), (5, 5), (5, 6), (10, 1000)])
def test_decay_steps_valid(warmup, decay):
    cfg = OptimConfig(lr_warmup_steps=warmup, lr_decay_steps=decay)
    assert (cfg.lr_warmup_steps, cfg.lr_decay_steps) == (warmup, decay)


@pytest.mark.parametrize(
    "warmup, decay",
    [
        (0, 0),  # decay steps must be >= 1
        (0, -3),
        (5, 4),  # decay steps must cover the warmup
        (100, 1),
    ],
)
def test_decay_steps_invalid(warmup, decay):
    # The message names both keys of the rule and their values.
    with _raises("lr_decay_steps", f"must be >= max(1, lr_warmup_steps={warmup})", f"got {decay}"):
        OptimConfig(lr_warmup_steps=warmup, lr_decay_steps=decay)


def test_negative_warmup_invalid():
    with _raises("lr_warmup_steps", "must be >= 0", "got -1"):
        OptimConfig(lr_warmup_steps=-1, lr_decay_steps=1)


@pytest.mark.parametrize("clip", [0.0, 0.5, 1.0, 1e6])
def test_clip_grad_valid(clip):
    assert OptimConfig(clip_grad=clip).clip_grad == clip


@pytest.mark.parametrize("clip", [-1e-9, -1.0])
def test_clip_grad_invalid(clip):
    with _raises("clip_grad", "must be >= 0", f"got {clip}"):
        OptimConfig(clip_grad=clip)


def test_first_broken_rule_is_reported():
    # Several keys broken at once: the error still names a key (the first rule checked).
    with _raises("optimizer", "got 'nope'"):
        OptimConfig(optimizer="nope", lr=-1.0, clip_grad=-1.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=math.nan), dict(lr=math.inf), dict(min_lr=math.nan), dict(clip_grad=math.nan)],
)
def test_non_finite_optim_values_rejected(kwargs):
    (key, value), = kwargs.items()
    with _raises(key, "must be finite", f"got {value}"):
        OptimConfig(**kwargs)


# ---------------------------------------------------------------------------------- BatchConfig


@pytest.mark.parametrize(
    "global_pairs, micro_pairs, dp, expected",
    [
        (8, 1, 1, 8),
        (8, 1, 2, 4),
        (8, 2, 2, 2),
        (8, 4, 2, 1),
        (8, 8, 1, 1),
        (8, 1, 8, 1),
        (12, 2, 3, 2),
        (6, 3, 2, 1),
        (64, 4, 4, 4),
    ],
)
def test_micro_batches_per_rank(global_pairs, micro_pairs, dp, expected):
    n = BatchConfig(global_pairs, micro_pairs).micro_batches_per_rank(dp)
    assert n == expected and isinstance(n, int)
    assert n * micro_pairs * dp == global_pairs


@pytest.mark.parametrize(
    "global_pairs, micro_pairs, dp",
    [
        (8, 3, 1),  # micro_pairs does not divide
        (8, 1, 3),  # dp does not divide
        (6, 2, 2),  # each divides, their product does not
        (8, 16, 1),  # micro-batch larger than the batch
        (8, 2, 8),  # more ranks x micro than pairs
        (7, 1, 2),
    ],
)
def test_micro_batches_per_rank_indivisible(global_pairs, micro_pairs, dp):
    cfg = BatchConfig(global_pairs, micro_pairs)
    with _raises("global_pairs", "rule global_pairs % (micro_pairs * DP) == 0 violated") as info:
        cfg.micro_batches_per_rank(dp)
    msg = str(info.value)
    assert f"global_pairs={global_pairs}" in msg and f"micro_pairs={micro_pairs}" in msg and f"DP={dp}" in msg


@pytest.mark.parametrize("global_pairs, micro_pairs, dp", [(0, 1, 1), (8, 0, 1), (8, 1, 0), (-8, 1, 1)])
def test_non_positive_batch_geometry_rejected(global_pairs, micro_pairs, dp):
    with pytest.raises(ConfigError):
        BatchConfig(global_pairs, micro_pairs).micro_batches_per_rank(dp)


# ----------------------------------------------------------------------------------- LossConfig


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_loss_type_valid(loss_type):
    assert LossConfig(loss_type=loss_type).loss_type == loss_type


@pytest.mark.parametrize("loss_type", ["dpo", "Sigmoid", "kto", "", "robust"])
def test_loss_type_invalid(loss_type):
    with _raises("loss_type", "one of sigmoid, ipo, hinge, simpo", f"got {loss_type!r}"):
        LossConfig(loss_type=loss_type)


@pytest.mark.parametrize("beta", [0.1, 1e-4, 5.0, (0.1,), (0.5, 0.2, 0.1), [0.3, 0.1]])
def test_beta_valid(beta):
    assert LossConfig(beta=beta).beta == beta


@pytest.mark.parametrize(
    "beta",
    [0.0, -0.1, -1e-12, (), (0.0,), (0.1, 0.0), (0.1, 0.2, -0.3), (-1.0, 0.5), [0.1, -0.1], []],
)
def test_beta_invalid(beta):
    with _raises("beta") as info:
        LossConfig(beta=beta)
    msg = str(info.value)
    if beta in ((), []):
        assert "the per-iteration list is empty" in msg, msg
    else:  # the first bad entry, by position in a list, and its value
        bad = next((i, b) for i, b in enumerate(beta if isinstance(beta, (tuple, list)) else [beta]) if b <= 0)
        where = f"beta[{bad[0]}]" if isinstance(beta, (tuple, list)) else "beta"
        assert f"{where} must be finite and > 0, got {float(bad[1])!r}" in msg, msg


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.4999])
def test_label_smoothing_valid(loss_type, eps):
    assert LossConfig(loss_type=loss_type, label_smoothing=eps).label_smoothing == eps


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "ipo", "hinge"])
@pytest.mark.parametrize("eps", [-0.01, 0.5, 0.7, 1.0])
def test_label_smoothing_out_of_range(loss_type, eps):
    with _raises("label_smoothing", "must be in [0, 0.5)", f"got {eps}"):
        LossConfig(loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_wrong_loss_type(loss_type):
    assert LossConfig(loss_type=loss_type, label_smoothing=0.0).label_smoothing == 0.0
    with _raises("label_smoothing", f"applies to sigmoid and simpo, not {loss_type!r}") as info:
        LossConfig(loss_type=loss_type, label_smoothing=0.1)
    assert str(info.value).endswith(f"not {loss_type!r}")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_simpo_gamma_valid_for_simpo(gamma):
    assert LossConfig(loss_type="simpo", simpo_gamma=gamma).simpo_gamma == gamma


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_simpo_gamma_only_for_simpo(loss_type, gamma):
    assert LossConfig(loss_type=loss_type, simpo_gamma=0.0).simpo_gamma == 0.0
    with _raises("simpo_gamma", f"applies to simpo only, not {loss_type!r}") as info:
        LossConfig(loss_type=loss_type, simpo_gamma=gamma)
    assert str(info.value).endswith(f"not {loss_type!r}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_negative_simpo_gamma_rejected(loss_type):
    # A negative γ breaks the range rule first, whatever the loss type.
    with _raises("simpo_gamma", "must be >= 0", "got -0.5"):
        LossConfig(loss_type=loss_type, simpo_gamma=-0.5)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 10.0])
def test_nll_weight_valid(weight):
    assert LossConfig(nll_weight=weight).nll_weight == weight


@pytest.mark.parametrize("weight", [-1e-9, -1.0])
def test_nll_weight_invalid(weight):
    with _raises("nll_weight", "must be >= 0", f"got {weight}"):
        LossConfig(nll_weight=weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="simpo", simpo_gamma=-0.5),
        dict(beta=math.nan),
        dict(beta=math.inf),
        dict(beta=(0.1, math.nan)),
        dict(beta=True),
        dict(nll_weight=math.nan),
        dict(nll_weight=math.inf),
    ],
)
def test_loss_config_agrees_with_loss_validation(kwargs):
    with pytest.raises(ConfigError):
        LossConfig(**kwargs)
