"""The PPO reward and advantage math (recipe §6), checked by hand-worked examples."""

from __future__ import annotations

import math

import torch

from llama2.reward import logit, piecewise, whiten
from llama2.stages.ppo import Rollout, build_rollout, gae, response_logprobs
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
    kl = (lp - lr) * ro.mask
    assert kl[1, 1:].abs().sum() == 0  # padding carries no KL
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
