"""Advantages and the clipped policy loss against hand computations and a naive per-token loop."""

import math

import pytest
import torch

import grpo

NAN = float("nan")


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 4.0])
    adv = grpo.group_advantages(rewards, group_size=4, eps=0.0)
    std1 = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)  # sample std of 1, 2, 3, 4
    assert torch.allclose(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std1)
    std2 = math.sqrt((3 * 1.0 ** 2 + 3.0 ** 2) / 3)  # 0, 0, 0, 4: mean 1
    assert torch.allclose(adv[4:], torch.tensor([-1.0, -1.0, -1.0, 3.0]) / std2)


def test_dr_grpo_drops_the_std():
    adv = grpo.group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([-2.0, -1.0, 3.0]))


def test_equal_missing_and_singleton_groups_give_zero_never_nan():
    rewards = torch.tensor([2.0, 2.0, 2.0,  # all equal
                            NAN, 5.0, NAN,  # one valid reward: no baseline
                            NAN, NAN, NAN,  # none valid
                            1.0, NAN, 3.0])  # the missing one is left out of the statistics
    adv = grpo.group_advantages(rewards, 3)
    assert not adv.isnan().any()
    assert (adv[:9] == 0).all()
    assert torch.allclose(adv[9:], torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2) + 1e-6))
    assert grpo.trained_rows(rewards, 3).tolist() == [True] * 3 + [False] * 6 + [True, False, True]


def naive_loss(logp, old, adv, mask, aggregation, clip_low, clip_high, ref=None, beta=0.0, max_new_tokens=None):
    """The loss written token by token, as in the papers."""
    per_seq, total, tokens = [], 0.0, 0
    for i in range(logp.size(0)):
        seq = []
        for t in range(logp.size(1)):
            if not mask[i, t]:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            term = -torch.min(rho * adv[i], torch.clamp(rho, 1 - clip_low, 1 + clip_high) * adv[i])
            if ref is not None:
                term = term + beta * (torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1)
            seq.append(term)
        if seq:
            per_seq.append(sum(seq) / len(seq))
            total, tokens = total + sum(seq), tokens + len(seq)
    if aggregation == "token":
        return total / tokens
    if aggregation == "sequence":
        return sum(per_seq) / len(per_seq)
    return total / (len(per_seq) * max_new_tokens)


def random_batch(seed=0, rows=5, width=6):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(rows, width, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(rows, width, generator=g) * 0.3  # ratios well outside [0.8, 1.2]
    ref = logp.detach() + torch.randn(rows, width, generator=g) * 0.3
    adv = torch.randn(rows, generator=g)
    lengths = torch.tensor([6, 1, 4, 0, 3])  # row 3 is excluded from training
    mask = (torch.arange(width) < lengths[:, None]).long()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_and_gradient_match_naive(aggregation, beta):
    logp, old, ref, adv, mask = random_batch()
    normalizer = grpo.loss_normalizer(mask, aggregation, max_new_tokens=8)
    loss, stats = grpo.policy_loss(logp, old, adv, mask, normalizer, aggregation, clip_low=0.2, clip_high=0.28,
                                   ref_logprobs=ref if beta else None, kl_coef=beta)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = naive_loss(logp, old, adv, mask, aggregation, 0.2, 0.28, ref if beta else None, beta, 8)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert (grad[mask == 0] == 0).all()
    assert stats["tokens"] == 14 and 0 < stats["clipped"] < 14


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_overflow_at_masked_positions_changes_nothing(aggregation):
    """A padded position may hold any log-prob (-1e4 from a masked logit, an old policy far away): exp of it
    overflows to inf, and masking by multiplying would give inf * 0 = NaN in the loss and its gradient."""
    logp, old, ref, adv, mask = random_batch(seed=3)
    assert mask[1, 2] == 0 and mask[1, 4] == 0

    def loss_grad_stats(masked_logp, masked_old):
        x, o = logp.detach().clone(), old.clone()
        x[1, 2], ref[1, 2], o[1, 4] = masked_logp, 0.0, masked_old
        x.requires_grad_()
        normalizer = grpo.loss_normalizer(mask, aggregation, 8)
        loss, stats = grpo.policy_loss(x, o, adv, mask, normalizer, aggregation, ref_logprobs=ref, kl_coef=0.05)
        return loss, torch.autograd.grad(loss, x)[0], stats

    loss, grad, stats = loss_grad_stats(-1e4, old[1, 4] - 1e4)  # exp(ref - logp) and exp(logp - old) are inf
    clean_loss, clean_grad, clean_stats = loss_grad_stats(0.0, old[1, 4])  # ordinary values
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()
    assert torch.allclose(loss, clean_loss) and torch.allclose(grad, clean_grad)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats == pytest.approx(clean_stats)


def test_each_clip_branch_by_hand():
    """One token per row; d loss / d logp = -A * rho where the unclipped term is the min, else 0."""
    rho = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    logp = rho.log().view(-1, 1).requires_grad_()
    old = torch.zeros(6, 1)
    mask = torch.ones(6, 1)
    loss, stats = grpo.policy_loss(logp, old, adv, mask, normalizer=6.0, clip_low=0.2, clip_high=0.2)
    # A>0, rho above 1+eps: clipped (flat).   A<0, rho above: unclipped, keeps pushing down.
    # A>0, rho below 1-eps: unclipped.         A<0, rho below: clipped.   Inside the range: unclipped.
    surrogate = torch.tensor([1.2 * 1, 1.5 * -1, 0.5 * 1, 0.8 * -1, 1.1 * 1, 0.9 * -1])
    assert torch.allclose(loss, -surrogate.sum() / 6)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -adv * rho * torch.tensor([0.0, 1, 1, 0, 1, 1]) / 6
    assert torch.allclose(grad.flatten(), expected)
    assert stats["clipped"] == 2


def test_ratio_one_still_gives_the_policy_gradient():
    """With one inner update, old = logp.detach(): the loss is -A on every token but the gradient is not zero."""
    logp, _, _, adv, mask = random_batch(seed=1)
    loss, _ = grpo.policy_loss(logp, logp.detach(), adv, mask, grpo.loss_normalizer(mask, "token", 8))
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -adv[:, None] * mask / mask.sum()  # REINFORCE with a group baseline
    assert torch.allclose(grad, expected)


def test_k3_direction_and_gradient():
    """k3 = exp(ref - logp) - (ref - logp) - 1: zero at logp = ref, positive elsewhere, gradient toward ref."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5, -3.5]])
    loss, stats = grpo.policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 3), 3.0,
                                   ref_logprobs=ref, kl_coef=1.0)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    assert k3[0, 0] == 0 and (k3[0, 1:] > 0).all()
    assert torch.isclose(loss, k3.sum() / 3) and math.isclose(stats["ref_kl"], k3.sum().item(), rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, (1 - torch.exp(ref - logp)) / 3)  # d/dlogp of k3
    assert grad[0, 1] < 0 < grad[0, 2], "descent (-grad) raises logp where it is below ref and lowers it above"


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batch_split_does_not_change_the_gradient(aggregation):
    logp, old, _, adv, mask = random_batch(seed=2)
    normalizer = grpo.loss_normalizer(mask, aggregation, 8)
    full, _ = grpo.policy_loss(logp, old, adv, mask, normalizer, aggregation)
    (full_grad,) = torch.autograd.grad(full, logp)
    # the normaliser is the sum of the micro-batches' shares, taken before any backward
    parts = [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert torch.isclose(sum(grpo.loss_normalizer(mask[p], aggregation, 8) for p in parts), normalizer)
    split = sum(grpo.policy_loss(logp[p], old[p], adv[p], mask[p], normalizer, aggregation)[0] for p in parts)
    (split_grad,) = torch.autograd.grad(split, logp)
    assert torch.allclose(full, split) and torch.allclose(full_grad, split_grad)


def test_sequence_mean_has_the_length_bias_token_mean_has_not():
    """Same negative advantage, one short and one long wrong answer: under the sequence mean each token
    of the long answer is pushed down less; under the token mean every token is pushed the same."""
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([-1.0, -1.0])
    grads = {}
    for aggregation in ["sequence", "token"]:
        loss, _ = grpo.policy_loss(logp, logp.detach(), adv, mask, grpo.loss_normalizer(mask, aggregation, 4),
                                   aggregation)
        (grads[aggregation],) = torch.autograd.grad(loss, logp)
    assert grads["sequence"][0, 0] == 4 * grads["sequence"][1, 0]
    assert grads["token"][0, 0] == grads["token"][1, 0]


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="mean"):
        grpo.loss_normalizer(torch.ones(1, 1), "mean", 4)
