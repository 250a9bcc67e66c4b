"""megatron_spin.loss: hand-derived values, gradients, validation, and agreement with TRL.

The TRL tests compare against TRL's own trainers (DPOTrainer._compute_loss, CPOTrainer.
cpo_loss) driven with stand-in objects that carry only the attributes those methods read.
trl is a dev dependency: if it is missing these tests fail (they do not skip).
"""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from megatron_spin.loss import LOSS_TYPES, PreferenceLossOutput, preference_loss, resolve_beta


def _t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _softplus(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x}), written out with the math module."""
    return math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- hand-derived values
# Two pairs.  Pair 0: π_c=-10, π_r=-14, ref_c=-11, ref_r=-13  ->  h_c=1, h_r=-1, Δ=2.
#             Pair 1: π_c=-20, π_r=-12, ref_c=-18, ref_r=-15  ->  h_c=-2, h_r=3, Δ=-5.
PC, PR, RC, RR = _t(-10.0, -20.0), _t(-14.0, -12.0), _t(-11.0, -18.0), _t(-13.0, -15.0)
LEN_C, LEN_R = _t(4.0, 5.0), torch.tensor([2, 10])  # lengths may be integer tensors


def test_sigmoid_hand_values():
    out = preference_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid")
    assert isinstance(out, PreferenceLossOutput)
    expected = [_softplus(0.5 * 2), _softplus(0.5 * -5)]
    torch.testing.assert_close(out.losses, _t(*expected))
    torch.testing.assert_close(out.chosen_rewards, _t(0.5 * 1, 0.5 * -2))
    torch.testing.assert_close(out.rejected_rewards, _t(0.5 * -1, 0.5 * 3))
    assert out.nll is None


def test_cdpo_label_smoothing_hand_values():
    eps = 0.1
    out = preference_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid", label_smoothing=eps)
    expected = [(1 - eps) * _softplus(z) + eps * _softplus(-z) for z in (1.0, -2.5)]
    torch.testing.assert_close(out.losses, _t(*expected))


def test_hinge_hand_values():
    out = preference_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge")
    torch.testing.assert_close(out.losses, _t(1 - 0.25 * 2, 1 - 0.25 * -5))
    # Margin past 1/β: zero loss.
    out = preference_loss(PC, PR, RC, RR, beta=2.0, loss_type="hinge")
    assert out.losses[0].item() == 0.0


def test_ipo_hand_values_use_per_token_margin():
    # Δ̄ = h_c/len_c - h_r/len_r; pair 0: 1/4 + 1/2 = 0.75; pair 1: -2/5 - 3/10 = -0.7.
    beta = 0.5
    out = preference_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo", chosen_lengths=LEN_C, rejected_lengths=LEN_R)
    target = 1 / (2 * beta)
    torch.testing.assert_close(out.losses, _t((0.75 - target) ** 2, (-0.7 - target) ** 2))
    # Rewards stay on token sums, as in TRL.
    torch.testing.assert_close(out.chosen_rewards, _t(0.5, -1.0))


def test_simpo_hand_values():
    # avg: pair 0 chosen -10/4=-2.5, rejected -14/2=-7; pair 1 chosen -20/5=-4, rejected -12/10=-1.2.
    beta, gamma = 2.0, 0.5
    out = preference_loss(
        PC, PR, None, None, beta=beta, loss_type="simpo", simpo_gamma=gamma,
        chosen_lengths=LEN_C, rejected_lengths=LEN_R,
    )
    expected = [_softplus(beta * (-2.5 + 7) - gamma), _softplus(beta * (-4 + 1.2) - gamma)]
    torch.testing.assert_close(out.losses, _t(*expected))
    torch.testing.assert_close(out.chosen_rewards, _t(beta * -2.5, beta * -4))
    torch.testing.assert_close(out.rejected_rewards, _t(beta * -7, beta * -1.2))
    # Reference log-probs, when passed anyway, change nothing.
    again = preference_loss(
        PC, PR, RC, RR, beta=beta, loss_type="simpo", simpo_gamma=gamma,
        chosen_lengths=LEN_C, rejected_lengths=LEN_R,
    )
    torch.testing.assert_close(again.losses, out.losses)


def test_simpo_label_smoothing_hand_values():
    eps, beta = 0.2, 1.0
    out = preference_loss(
        PC, PR, None, None, beta=beta, loss_type="simpo", label_smoothing=eps,
        chosen_lengths=LEN_C, rejected_lengths=LEN_R,
    )
    zs = (-2.5 + 7, -4 + 1.2)
    torch.testing.assert_close(out.losses, _t(*[(1 - eps) * _softplus(z) + eps * _softplus(-z) for z in zs]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nll_term_added_per_pair(loss_type):
    kw = dict(beta=0.5, loss_type=loss_type, chosen_lengths=LEN_C, rejected_lengths=LEN_R)
    base = preference_loss(PC, PR, RC, RR, **kw)
    with_nll = preference_loss(PC, PR, RC, RR, nll_weight=0.3, **kw)
    nll = [10 / 4, 20 / 5]  # -π_c / len_c
    torch.testing.assert_close(with_nll.nll, _t(*nll))
    torch.testing.assert_close(base.nll, _t(*nll))  # reported whenever chosen_lengths is given
    torch.testing.assert_close(with_nll.losses - base.losses, _t(0.3 * nll[0], 0.3 * nll[1]))


# --------------------------------------------------------------------------- gradients
_GRAD_CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("hinge", {}),
    ("ipo", {}),
    ("simpo", {"simpo_gamma": 0.3}),
    ("simpo", {"label_smoothing": 0.1}),
    ("sigmoid", {"nll_weight": 0.5}),
]


@pytest.mark.parametrize(("loss_type", "extra"), _GRAD_CASES)
def test_gradcheck(loss_type, extra):
    g = torch.Generator().manual_seed(1)
    P = 6
    pc = (-30 * torch.rand(P, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-30 * torch.rand(P, generator=g, dtype=torch.float64)).requires_grad_()
    rc = -30 * torch.rand(P, generator=g, dtype=torch.float64)
    rr = -30 * torch.rand(P, generator=g, dtype=torch.float64)
    lc = torch.randint(1, 20, (P,), generator=g)
    lr = torch.randint(1, 20, (P,), generator=g)
    beta = 0.1
    if loss_type == "hinge":  # every pair must be off the kink at βΔ = 1, where relu has no derivative
        delta = (pc - pr - rc + rr).detach()
        assert ((1 - beta * delta).abs() > 1e-3).all()

    def f(a, b):
        return preference_loss(
            a, b, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, **extra
        ).losses

    assert torch.autograd.gradcheck(f, (pc, pr))


def test_sigmoid_sign_more_chosen_logprob_lowers_loss():
    pc = _t(-10.0, -20.0).requires_grad_()
    pr = _t(-14.0, -12.0).requires_grad_()
    out = preference_loss(pc, pr, RC, RR, beta=0.1, loss_type="sigmoid")
    out.losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    higher = preference_loss(pc.detach() + 1.0, pr.detach(), RC, RR, beta=0.1, loss_type="sigmoid")
    assert (higher.losses < out.losses.detach()).all()


def test_reference_gets_no_gradient():
    rc, rr = RC.clone().requires_grad_(), RR.clone().requires_grad_()
    pc = PC.clone().requires_grad_()
    preference_loss(pc, PR, rc, rr, beta=0.1, loss_type="sigmoid").losses.sum().backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_numerically_stable_at_extreme_margins():
    pc = torch.tensor([0.0, -1e5], requires_grad=True)
    pr = torch.tensor([-1e5, 0.0])
    zeros = torch.zeros(2)
    for ls in (0.0, 0.1):
        out = preference_loss(pc, pr, zeros, zeros, beta=1.0, loss_type="sigmoid", label_smoothing=ls)
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.losses, torch.tensor([0.1 * 1e5, 0.9 * 1e5]))
    assert grad[1].item() == pytest.approx(-0.9)  # the losing pair still gets a full gradient


def test_bf16_inputs_computed_in_float32():
    pc = PC.to(torch.bfloat16).requires_grad_()
    out = preference_loss(pc, PR.bfloat16(), RC.bfloat16(), RR.bfloat16(), beta=0.5, loss_type="sigmoid")
    assert out.losses.dtype == torch.float32
    out.losses.sum().backward()
    assert pc.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- β per iteration
def test_beta_list_per_iteration_last_repeats():
    betas = [0.1, 0.2, 0.4]
    assert [resolve_beta(betas, i) for i in range(6)] == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert resolve_beta((0.3,), 7) == 0.3 and resolve_beta(0.05, 9) == 0.05
    for it, b in [(0, 0.1), (1, 0.2), (2, 0.4), (10, 0.4)]:
        out = preference_loss(PC, PR, RC, RR, beta=betas, loss_type="sigmoid", iteration=it)
        torch.testing.assert_close(out.losses, _t(_softplus(b * 2), _softplus(b * -5)))
        torch.testing.assert_close(out.chosen_rewards, _t(b * 1, b * -2))


# --------------------------------------------------------------------------- validation
_OK = dict(beta=0.1, loss_type="sigmoid")


def _call(pc=PC, pr=PR, rc=RC, rr=RR, **kw):
    return preference_loss(pc, pr, rc, rr, **{**_OK, **kw})


_INVALID = [
    (dict(loss_type="kto"), r"loss_type='kto' is not one of \('sigmoid', 'ipo', 'hinge', 'simpo'\)"),
    (dict(beta=0.0), r"beta"),
    (dict(beta=-0.1), r"beta"),
    (dict(beta=float("nan")), r"beta"),
    (dict(beta=True), r"beta"),
    (dict(beta=[]), r"beta.*empty"),
    (dict(beta=[0.1, 0.0]), r"beta\[1\]"),
    (dict(beta="0.1"), r"beta"),
    (dict(iteration=-1), r"iteration"),
    (dict(label_smoothing=-0.01), r"label_smoothing"),
    (dict(label_smoothing=0.5), r"label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing.*'hinge'"),
    (
        dict(loss_type="ipo", label_smoothing=0.1, chosen_lengths=LEN_C, rejected_lengths=LEN_R),
        r"label_smoothing.*'ipo'",
    ),
    (dict(simpo_gamma=0.5), r"simpo_gamma.*simpo"),
    (dict(loss_type="simpo", simpo_gamma=-1.0, chosen_lengths=LEN_C, rejected_lengths=LEN_R), r"simpo_gamma"),
    (dict(nll_weight=-0.1), r"nll_weight"),
    (dict(nll_weight=0.1), r"chosen_lengths.*nll_weight"),
    (dict(loss_type="simpo"), r"chosen_lengths.*simpo"),
    (dict(loss_type="simpo", chosen_lengths=LEN_C), r"rejected_lengths.*simpo"),
    (dict(loss_type="ipo", chosen_lengths=LEN_C), r"rejected_lengths.*ipo"),
    (dict(rc=None), r"ref_chosen_logps.*required"),
    (dict(loss_type="hinge", rr=None), r"ref_rejected_logps.*required"),
    (dict(pr=_t(-1.0, -2.0, -3.0)), r"policy_rejected_logps.*shape"),
    (dict(rc=_t(-1.0)), r"ref_chosen_logps.*shape"),
    (dict(rr=_t(-1.0, -2.0, -3.0)), r"ref_rejected_logps.*shape"),
    (dict(pc=PC[None, :]), r"policy_chosen_logps.*\[P\]"),
    (dict(pc=[-1.0, -2.0]), r"policy_chosen_logps.*torch.Tensor"),
    (dict(pr=torch.tensor([-1, -2])), r"policy_rejected_logps.*floating"),
    (dict(loss_type="ipo", chosen_lengths=_t(4.0), rejected_lengths=LEN_R), r"chosen_lengths.*shape"),
    (dict(loss_type="ipo", chosen_lengths=LEN_C, rejected_lengths=torch.tensor([3, 0])), r"rejected_lengths.*> 0"),
    (dict(loss_type="simpo", chosen_lengths=[4, 5], rejected_lengths=LEN_R), r"chosen_lengths.*torch.Tensor"),
]


@pytest.mark.parametrize(("kwargs", "match"), _INVALID, ids=[m for _, m in _INVALID])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_empty_batch_is_fine():
    e = torch.empty(0, dtype=torch.float64)
    out = _call(pc=e, pr=e, rc=e, rr=e)
    assert out.losses.shape == (0,)


# --------------------------------------------------------------------------- agreement with TRL
class _Accelerator:
    """What TRL's loss code reads from an accelerate.Accelerator on one process."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _trl_object(cls, **attrs):
    obj = cls.__new__(cls)  # no __init__: it would want a model, tokenizer and dataset
    for k, v in {"accelerator": _Accelerator(), **attrs}.items():
        object.__setattr__(obj, k, v)
    return obj


@pytest.fixture(scope="module")
def trl_dpo():
    """``(loss_type, beta, label_smoothing, pc, pr, rc, rr, lc, lr) -> (mean loss, metrics)``.

    Runs TRL DPOTrainer._compute_loss with precomputed reference log-probs and a stand-in
    model whose per-token log-probs are spread evenly over each completion, so that TRL's
    token sum equals the given sequence log-prob and its completion_mask holds the lengths.
    """
    from trl import DPOTrainer  # a missing trl fails here: trl is in the dev extra

    def run(loss_type, beta, label_smoothing, pc, pr, rc, rr, lc, lr):
        metrics = collections.defaultdict(lambda: collections.defaultdict(list))
        trainer = _trl_object(
            DPOTrainer, model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
            beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics=metrics,
            _total_train_tokens=0, _tp_size=1,
        )
        P = pc.shape[0]
        lens = torch.cat([lc, lr]).long()
        T = int(lens.max()) + 2  # at least one prompt token in front of every completion
        completion_mask = torch.zeros(2 * P, T, dtype=torch.long)
        for i, n in enumerate(lens.tolist()):
            completion_mask[i, T - n:] = 1
        logps = torch.cat([pc, pr])  # TRL's batch layout: [chosen..., rejected...]
        per_token = completion_mask[:, 1:].double() * (logps / lens)[:, None]

        def model(**_):
            z = torch.zeros(2 * P, T)
            return types.SimpleNamespace(
                log_probs=per_token, entropy=z, mean_logits=z, is_top1=torch.zeros(2 * P, T, dtype=torch.bool)
            )

        inputs = dict(
            input_ids=torch.zeros(2 * P, T, dtype=torch.long), attention_mask=torch.ones(2 * P, T, dtype=torch.long),
            completion_mask=completion_mask, ref_chosen_logps=rc, ref_rejected_logps=rr,
        )
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
        return loss, metrics["train"]

    return run


@pytest.fixture(scope="module")
def trl_cpo():
    """``(loss_type, beta, label_smoothing, gamma, chosen, rejected) -> (losses, chosen_r, rejected_r)``."""
    from trl.experimental.cpo import CPOTrainer

    def run(loss_type, beta, label_smoothing, gamma, chosen, rejected):
        trainer = _trl_object(
            CPOTrainer, alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma
        )
        return trainer.cpo_loss(chosen, rejected)

    return run


def _random_pairs(seed, P=12):
    g = torch.Generator().manual_seed(seed)
    logps = [-60 * torch.rand(P, generator=g, dtype=torch.float64) for _ in range(4)]
    lengths = [torch.randint(1, 40, (P,), generator=g) for _ in range(2)]
    return (*logps, *lengths)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_matches_trl_dpo_trainer(trl_dpo, loss_type, beta):
    pc, pr, rc, rr, lc, lr = _random_pairs(seed=int(beta * 100) + len(loss_type))
    ours = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    for i in range(len(pc)):  # one pair per TRL call: TRL returns the batch mean
        s = slice(i, i + 1)
        loss, metrics = trl_dpo(loss_type, beta, 0.0, pc[s], pr[s], rc[s], rr[s], lc[s], lr[s])
        assert ours.losses[i].item() == pytest.approx(loss.item(), abs=1e-6, rel=1e-9)
        assert ours.chosen_rewards[i].item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-6)
        assert ours.rejected_rewards[i].item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-6)
    # The whole batch at once (pairs of different lengths side by side): same mean.
    loss, _ = trl_dpo(loss_type, beta, 0.0, pc, pr, rc, rr, lc, lr)
    assert ours.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_matches_trl(trl_dpo, trl_cpo, eps):
    """TRL 1.16's DPO ``sigmoid`` ignores label_smoothing; its cDPO formula lives in two places.

    DPOTrainer ``aot`` is cDPO on Δ after sorting the batch, so with one pair per call it is
    exactly cDPO; CPOTrainer ``sigmoid`` is cDPO on the log-prob margin it is given, so fed the
    log-ratios it is cDPO on Δ.
    """
    beta = 0.2
    pc, pr, rc, rr, lc, lr = _random_pairs(seed=int(eps * 10))
    ours = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    cpo_losses, _, _ = trl_cpo("sigmoid", beta, eps, 0.0, pc - rc, pr - rr)
    torch.testing.assert_close(ours.losses, cpo_losses, atol=1e-6, rtol=0)
    for i in range(len(pc)):
        s = slice(i, i + 1)
        loss, _ = trl_dpo("aot", beta, eps, pc[s], pr[s], rc[s], rr[s], lc[s], lr[s])
        assert ours.losses[i].item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize(("gamma", "eps"), [(0.0, 0.0), (0.5, 0.0), (1.2, 0.1)])
def test_simpo_matches_trl_cpo(trl_cpo, gamma, eps):
    beta = 2.0
    pc, pr, _, _, lc, lr = _random_pairs(seed=7)
    ours = preference_loss(
        pc, pr, None, None, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps,
        chosen_lengths=lc, rejected_lengths=lr,
    )
    # TRL's CPO trainer feeds average per-token log-probs to cpo_loss for loss_type="simpo".
    losses, chosen_r, rejected_r = trl_cpo("simpo", beta, eps, gamma, pc / lc, pr / lr)
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, atol=1e-6, rtol=0)
