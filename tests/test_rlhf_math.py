"""The RLHF math (llama2.rlhf_math: recipe §4, §6), checked by hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from llama2.rlhf_math import (
    MARGINS,
    SAFETY_THRESHOLD,
    auxiliary_safety_loss,
    gae,
    kl_penalized_rewards,
    logit,
    margin_ranking_loss,
    normalized_reward,
    piecewise,
    policy_loss,
    value_loss,
    whiten,
)
from llama2.stages.ppo import Rollout, build_rollout, response_logprobs
from llama2.stages.rejection_sampling import max_vs_median, selection_quality


def test_piecewise_switches_at_threshold_and_safety_tag():
    rs = torch.tensor([0.9, 0.9, 0.10, 0.16, 0.14])
    rh = torch.tensor([0.2, 0.2, 0.80, 0.80, 0.80])
    tag = torch.tensor([True, False, False, False, False])
    rc = piecewise(rs, rh, tag)
    # tagged -> Rs; untagged and Rs >= 0.15 -> Rh; Rs < 0.15 -> Rs.
    assert rc.tolist() == [rs[0].item(), rh[1].item(), rs[2].item(), rh[3].item(), rs[4].item()]
    assert torch.equal(piecewise(rs, rh, tag, safety_switch=False), rh)


def test_logit_inverts_sigmoid_and_whiten_normalizes():
    x = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0])
    assert torch.allclose(logit(torch.sigmoid(x)), x, atol=1e-4)
    assert math.isfinite(float(logit(torch.tensor(1.0))))
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert abs(float(w.mean())) < 1e-6 and abs(float(w.std(unbiased=False)) - 1) < 1e-5


def test_gae_matches_hand_computation():
    # One sequence of 3 tokens, gamma=1, lam=0.5.
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.4]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.4  # last: r + 0 - V
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.5 * a2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + v)
    # Padding after the end contributes nothing and gets no advantage.
    r2 = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v2 = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    adv2, _ = gae(r2, v2, torch.tensor([[1.0, 1, 1, 0]]), 1.0, 0.5)
    assert torch.allclose(adv2[:, :3], adv) and adv2[0, 3] == 0


def test_piecewise_threshold_is_strict_and_on_probabilities():
    # Recipe §6: Rs < 0.15 (strictly) switches to the safety score; 0.15 itself keeps Rh.
    assert SAFETY_THRESHOLD == 0.15
    just_below = torch.nextafter(torch.tensor(0.15), torch.tensor(0.0))
    rs = torch.stack([torch.tensor(0.15), just_below, torch.tensor(0.0), torch.tensor(1.0)])
    rh = torch.full((4,), 0.7)
    untagged = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(piecewise(rs, rh, untagged), torch.stack([rh[0], rs[1], rs[2], rh[3]]))
    # A safety-tagged prompt takes Rs whatever Rh is, even when Rs is high.
    assert torch.equal(piecewise(rs, rh, ~untagged), rs)
    assert torch.equal(piecewise(rs, rh, untagged, threshold=0.5),
                       torch.stack([rs[0], rs[1], rs[2], rh[3]]))


def test_whiten_zero_mean_unit_variance_under_a_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 5
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 0]], dtype=torch.float)
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(float(valid.mean())) < 1e-5
    assert abs(float(valid.var(unbiased=False)) - 1) < 1e-4
    assert torch.all(w[~mask.bool()] == 0)
    # What lies under the padding changes nothing.
    assert torch.allclose(whiten(x + 100 * (1 - mask), mask), w)
    # Without a mask it is the same statistic over every entry.
    assert torch.allclose(whiten(x), whiten(x, torch.ones_like(x)), atol=1e-6)
    assert torch.equal(whiten(torch.tensor([3.0])), torch.tensor([0.0]))


def test_normalized_reward_is_whitened_logit():
    rc = torch.tensor([0.1, 0.5, 0.9, 0.99])
    z = torch.log(rc / (1 - rc))
    want = (z - z.mean()) / z.std(unbiased=False)
    assert torch.allclose(normalized_reward(rc), want, atol=1e-5)


def test_kl_penalized_rewards_charge_each_token_and_add_the_score_at_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalized_rewards(score, logp, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]]))
    want = torch.tensor([[-0.05, 0.1, 2.0], [0.02 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, want)


def _gae_by_hand(r, v, mask, gamma, lam):
    """The recursion written out per sequence with plain floats."""
    out = []
    for rr, vv, mm in zip(r.tolist(), v.tolist(), mask.tolist()):
        n = int(sum(mm))
        a, row = 0.0, [0.0] * len(rr)
        for t in reversed(range(n)):
            next_v = vv[t + 1] if t + 1 < n else 0.0
            a = rr[t] + gamma * next_v - vv[t] + gamma * lam * a
            row[t] = a
        out.append(row)
    return torch.tensor(out)


def test_gae_matches_the_unrolled_recursion_on_a_padded_batch():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 4, 1, 6, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        adv, ret = gae(r, v, mask, gamma, lam)
        want = _gae_by_hand(r, v, mask, gamma, lam)
        assert torch.allclose(adv, want, atol=1e-5), (gamma, lam)
        assert torch.allclose(ret, (want + v) * mask, atol=1e-5)


def test_clipped_policy_loss_by_hand():
    # ratio = exp(logp - old): 1.5, 0.5, 1.1, and a padded token.
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]]))
    adv = torch.tensor([[1.0, -2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, ratio = policy_loss(logp, old, adv, mask, clip=0.2)
    assert torch.allclose(ratio[0, :3], torch.tensor([1.5, 0.5, 1.1]))
    # Positive advantage: the gain stops at 1 + clip; negative: the ratio counts at most at
    # 1 - clip (the pessimistic side); inside the range: -A * ratio.
    want = (-1.0 * 1.2 + 2.0 * 0.8 + -3.0 * 1.1) / 3
    assert abs(float(loss) - want) < 1e-6
    # The clipped side carries no gradient.
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, adv, mask, 0.2)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0 and lp.grad[0, 2] != 0
    assert lp.grad[0, 3] == 0


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1, 5.0]])
    ret = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0]])
    loss = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.01, 0.01) = 0.01.
    assert abs(float(loss) - 0.5 * (3.24 + 0.01) / 2) < 1e-6


def test_margin_ranking_loss_and_the_auxiliary_safety_loss():
    assert MARGINS["small"]["slightly_better"] == pytest.approx(1 / 3)
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([1.0, 0.0])
    # At r_c - r_r = m the loss is log 2 per pair, whatever the scores.
    assert float(margin_ranking_loss(chosen, rejected, margin)) == pytest.approx(math.log(2))
    want = (math.log1p(math.exp(-1.0)) + math.log(2)) / 2
    assert float(margin_ranking_loss(chosen, rejected, torch.zeros(2))) == pytest.approx(want)
    scores, safe = torch.tensor([3.0, -1.0, 8.0]), torch.tensor([1.0, 0.0, -1.0])
    aux = auxiliary_safety_loss(scores, safe)
    want = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.0))) / 2  # the third: unknown
    assert float(aux) == pytest.approx(want, rel=1e-6)
    assert auxiliary_safety_loss(scores, -torch.ones(3)) is None


def test_kl_per_token_against_reference():
    from llama2.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32)
    pi, ref = Transformer(args), Transformer(args)
    pi.init_weights(0.2)
    ref.init_weights(0.2)
    ro: Rollout = build_rollout([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], pad_id=0)
    with torch.no_grad():
        lp, lr = response_logprobs(pi, ro), response_logprobs(ref, ro)
    # Check one token by a plain forward pass: response token j of row 0 is predicted at
    # position len(prompt) - 1 + j.
    with torch.no_grad():
        full = torch.log_softmax(pi(torch.tensor([[1, 5, 6, 8, 9, 2]])), -1)[0]
    assert abs(float(lp[0, 1]) - float(full[3, 9])) < 1e-5
    _, kl = kl_penalized_rewards(torch.zeros(2), lp, lr, ro.mask, beta=0.1)
    assert kl[1, 1:].abs().sum() == 0  # padding carries no KL
    assert torch.allclose(kl[0], lp[0] - lr[0])
    assert ro.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_max_vs_median_gap_grows_with_k():
    g = torch.Generator().manual_seed(0)
    rc = torch.rand(200, 8, generator=g)
    c = max_vs_median(rc)
    gaps = [m - d for m, d in zip(c["max"], c["median"])]
    assert gaps[0] == 0 and all(b >= a - 1e-6 for a, b in zip(gaps, gaps[1:]))


def test_selection_quality_judges_the_reward_pick_against_the_samples():
    from llama2.world import World

    prompts = World(0).helpful_prompts(6, families=("facts",))
    # Two samples per prompt: the gold answer and an off-topic one.
    texts = [[p.answer, "I saw the light by the road today."] for p in prompts]
    fooled = torch.tensor([[0.1, 0.9]] * 6)  # the reward prefers the off-topic answer
    right = torch.tensor([[0.9, 0.1]] * 6)
    bad, good = selection_quality(prompts, texts, fooled), selection_quality(prompts, texts, right)
    assert bad["n_helpful_prompts"] == 6 and bad["mean_sample"] == good["mean_sample"]
    assert bad["pick"] < bad["mean_sample"] < good["pick"] == good["best_sample"]
    assert selection_quality([], [], torch.zeros(0, 2)) == {}


def test_shares_of_a_batch_give_the_batch_s_whitening_and_losses():
    """PPO under torchrun: each process holds some rows. With the batch's token count the
    losses' parts add up to the batch's loss, and whiten with `total` (an all-reduce, here two
    threads that sum what they exchange) gives each share its rows of the batch's whitening."""
    import threading

    g = torch.Generator().manual_seed(0)
    x, adv = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    shares = (slice(0, 2), slice(2, 6))
    count = mask.sum()
    loss, _ = policy_loss(x, x.flip(0), adv, mask)
    parts = [policy_loss(x[s], x.flip(0)[s], adv[s], mask[s], count=count)[0] for s in shares]
    assert torch.allclose(sum(parts), loss, atol=1e-6)

    barrier, slots = threading.Barrier(2), [None, None]
    got: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]

    def run(rank: int) -> None:
        def total(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()  # both have read before the next exchange overwrites the slots
            return out

        got[rank] = whiten(x[shares[rank]], mask[shares[rank]], total=total)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(got), whiten(x, mask), atol=1e-6)
