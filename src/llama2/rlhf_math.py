"""The RLHF math in one place (recipe §4 and §6, paper §3.2.2-3.2.3): pure tensor functions,
no models, no files. The reward-model stage, the scoring API, rejection sampling and PPO call
these; tests/test_rlhf_math.py checks each against hand-worked numbers.

Reward models (§4):
- `MARGINS`: the margin m(r) by rating level (Table 27: "none", "small", "large").
- `margin_ranking_loss(chosen, rejected, margin)`: -log sigmoid(r_c - r_r - m(r)) (eq. 2).
- `auxiliary_safety_loss(scores, safe)`: binary safe/unsafe cross-entropy on the score
  (Table 29), over the responses whose label is known.

The two-RM reward (§6):
- `piecewise(rs, rh, is_safety)`: Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh.
- `logit(p)`: LOGIT, the inverse of the sigmoid.
- `whiten(x, mask=None, total=None)`: WHITEN, zero mean and unit variance (over the mask's
  entries; with `total`, an all-reduce, over the entries of every process's share).
- `normalized_reward(rc)`: R~c = WHITEN(LOGIT(Rc)), one score per sequence.

PPO (§6):
- `kl_penalized_rewards(score, logp, ref_logp, mask, beta)`: per-token rewards, -beta * KL at
  every response token (the sampled token's log-ratio against pi_0), plus the score at the last.
- `gae(rewards, values, mask, gamma, lam)`: generalized advantage estimation and returns.
- `policy_loss(logp, old_logp, adv, mask, clip)`: the clipped surrogate objective.
- `value_loss(values, old_values, returns, mask, clip)`: the clipped value loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------- reward models (§4)
LEVELS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS = {  # paper Table 27
    "none": dict.fromkeys(LEVELS, 0.0),
    "small": dict(zip(LEVELS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(LEVELS, (3.0, 2.0, 1.0, 0.0))),
}


def margin_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor
                        ) -> torch.Tensor:
    """L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r))), averaged over the pairs (paper eq. 2)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def auxiliary_safety_loss(scores: torch.Tensor, safe: torch.Tensor) -> torch.Tensor | None:
    """Binary cross-entropy of sigmoid(score) against the safe (1) / unsafe (0) label, over
    the responses whose label is known (label < 0: unknown); None if none is (Table 29)."""
    known = safe >= 0
    if not bool(known.any()):
        return None
    return F.binary_cross_entropy_with_logits(scores[known], safe[known])


# ------------------------------------------------------------------ the two-RM reward (§6)
SAFETY_THRESHOLD = 0.15  # paper §3.2.3: precision 0.89 / recall 0.55 on the safety test set


def piecewise(rs: torch.Tensor, rh: torch.Tensor, is_safety: torch.Tensor,
              threshold: float = SAFETY_THRESHOLD, safety_switch: bool = True) -> torch.Tensor:
    """Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh, on probabilities (paper §3.2.3).

    safety_switch=False drops the safety RM entirely (Rc = Rh): the ablation that shows what
    the switch buys."""
    if not safety_switch:
        return rh
    return torch.where(is_safety.bool() | (rs < threshold), rs, rh)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo the sigmoid (paper: LOGIT), clamped away from 0 and 1."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def masked_mean(x: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (0 if there are none).

    count: the number of entries the mean is over when `x` is one process's share of a batch
    (the batch's valid entries): then this is the share's part of the batch's mean, and the
    parts of all shares add up to it. None: `mask`'s own count (`x` is the whole batch)."""
    n = mask.sum() if count is None else torch.as_tensor(count, dtype=mask.dtype,
                                                          device=mask.device)
    return (x * mask).sum() / n.clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8,
           total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """WHITEN: (x - mean) / sqrt(var + eps), mean and (biased) variance over all of `x`, or
    over the entries where `mask` is 1 (the others come out 0).

    total: where `x` is one process's share of a batch, the sum of a tensor over the processes
    (an all-reduce), so that the moments are the whole batch's; None: `x` is the whole batch."""
    if mask is None and total is None:
        mean = x.mean()
        return (x - mean) * torch.rsqrt(((x - mean) ** 2).mean() + eps)
    mask = torch.ones_like(x) if mask is None else mask
    total = total or (lambda t: t)
    count = total(mask.sum())
    mean = total(masked_mean(x, mask, count))  # the shares' parts add up to the batch's mean
    var = total(masked_mean((x - mean) ** 2, mask, count))
    return (x - mean) * torch.rsqrt(var + eps) * mask


def normalized_reward(rc: torch.Tensor) -> torch.Tensor:
    """R~c = WHITEN(LOGIT(Rc)) over the batch (paper §3.2.3): stabilizes training and
    balances the reward against the KL term."""
    return whiten(logit(rc))


# ------------------------------------------------------------------------------ PPO (§6)
def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, L] of R(g | p) = R~c - beta * KL(pi || pi_0) and the KL [B, L].

    The KL is charged per response token as log pi(token) - log pi_0(token) (0 on padding);
    the sequence's score [B] is added at its last valid token."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(len(score), device=rewards.device), last] += score
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens [B, L] (mask: valid tokens).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V)."""
    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(L)):
        m = mask[:, t].to(rewards.dtype)
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
    return adv, adv + values * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2,
                count: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate: mean over valid tokens of max(-A * ratio, -A * clip(ratio,
    1 - clip, 1 + clip)), ratio = pi / pi_old. Returns (loss, ratio). count: the minibatch's
    valid tokens when these rows are one process's share of it (`masked_mean`)."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(pg, mask, count), ratio


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2,
               count: torch.Tensor | float | None = None) -> torch.Tensor:
    """The clipped value loss: 0.5 * mean over valid tokens of max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clip(V - V_old, -clip, clip). count: as `policy_loss`'s."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clip - returns) ** 2), mask,
                             count)
