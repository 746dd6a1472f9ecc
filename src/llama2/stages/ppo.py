"""PPO with the two-RM reward and the KL penalty (recipe §6, paper §3.2.3).

Maximizes E[R(g | p)] with R(g | p) = WHITEN(LOGIT(Rc(g | p))) - beta * KL(pi || pi_0), where
Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh. The KL term is charged per token against the
frozen initial policy pi_0; the whitened score is added at the last token. Advantages by GAE;
clipped policy and value losses; one gradient step per minibatch; AdamW (0.9, 0.95, 1e-5),
weight decay 0.1, gradient clipping 1.0, constant LR; early stopping on held-out prompts.

The value function is a separate model initialized from the Helpfulness RM (its scalar head
read at every position), as InstructGPT does: it starts out knowing what a good answer is.

    llama2 ppo --model RS_MODEL --helpful-rm H --safety-rm S --out DIR [--iterations 200]
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llama2 import checkpoint
from llama2.chat import OnSpecialTags
from llama2.engine import TrainConfig, make_optimizer
from llama2.engine.checkpointing import rng_state, set_rng_state
from llama2.generation import reply
from llama2.reward import RewardModel, load_reward_model, logit, proxy_and_gold, whiten
from llama2.stages.common import load_policy, parse_stage
from llama2.stages.rejection_sampling import load_prompts
from llama2.utils import JsonlLogger, atomic_torch_save, atomic_write_text, seed_everything


@dataclass
class PPOConfig:
    model: str = ""  # initial policy (SFT or rejection-sampling checkpoint); also pi_0
    helpful_rm: str = ""
    safety_rm: str = ""
    out: str = "runs/ppo"
    prompts: list[str] = field(default_factory=lambda: ["world"])
    # A data-file record whose dialog text carries a chat tag ([INST], [/INST], <<SYS>>,
    # <</SYS>>): "error" (one line naming file, line and field) or "skip" (counted, summary).
    on_special_tags: OnSpecialTags = "error"
    world_seed: int = 0
    round: int = 0
    n_prompts: int = 2048  # pool of training prompts
    heldout_prompts: int = 64  # held-out prompts for early stopping and logging
    safety_share: float = 0.25
    borderline_share: float = 0.1
    # What PPO optimizes: "rm" (the two RMs, the recipe) or "annotator" (the world's annotators,
    # a gold-reward run). Every iteration logs both (proxy_reward, gold_reward).
    reward: str = "rm"
    iterations: int = 200  # paper: 200-400 with early stopping
    batch_prompts: int = 512  # paper: 512 prompts per iteration
    minibatch: int = 64  # paper: 64, one gradient step each
    ppo_epochs: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    beta: float = 0.01  # KL penalty (7B/13B; 0.005 for 34B/70B)
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    lr: float = 1e-6  # constant (paper)
    value_lr: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 10
    patience: int = 3  # evaluations without a better held-out reward before stopping
    safety_switch: bool = True  # False: the ablation without the safety RM switch
    save_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------- the pieces
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


@dataclass
class Rollout:
    tokens: torch.Tensor  # [B, T] prompt + response, right-padded
    index: torch.Tensor  # [B, L] position of the logits that predict response token j
    mask: torch.Tensor  # [B, L] valid response tokens
    targets: torch.Tensor  # [B, L] the response tokens


def build_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  device: torch.device | str = "cpu") -> Rollout:
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    L = max(1, max(len(r) for r in responses))
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    index = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L))
    targets = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        tokens[b, : len(p) + len(r)] = torch.tensor(p + r)
        index[b] = (len(p) - 1 + torch.arange(L)).clamp_max(T - 1)
        mask[b, : len(r)] = 1
        targets[b, : len(r)] = torch.tensor(r, dtype=torch.long) if r else targets[b, :0]
    return Rollout(tokens.to(device), index.to(device), mask.to(device), targets.to(device))


def response_logprobs(policy, ro: Rollout, with_entropy: bool = False):
    """log pi(response token j) [B, L] (and the entropy of pi at each step)."""
    h = policy.hidden(ro.tokens)
    h = h.gather(1, ro.index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    logp_all = F.log_softmax(policy.output(h).float(), -1)
    logp = logp_all.gather(-1, ro.targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_values(value_model: RewardModel, ro: Rollout) -> torch.Tensor:
    return value_model.values(ro.tokens).gather(1, ro.index)


# ------------------------------------------------------------------------- the loop
class PPO:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        seed_everything(cfg.seed)
        loaded = load_policy(cfg.model, cfg.device)
        self.policy, self.tok, self.args = loaded.model, loaded.tokenizer, loaded.args
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)  # pi_0, frozen
        self.value, _, _ = load_reward_model(cfg.helpful_rm, self.policy.output.weight.device)
        pool = load_prompts(cfg.prompts, cfg.world_seed, cfg.n_prompts + cfg.heldout_prompts,
                            cfg.safety_share, cfg.round, cfg.borderline_share,
                            on_special_tags=cfg.on_special_tags)
        self.rewards, self.proxy, self.gold = proxy_and_gold(
            cfg.reward, cfg.helpful_rm, cfg.safety_rm, pool, self.policy.output.weight.device,
            cfg.safety_switch)
        random.Random(cfg.seed).shuffle(pool)
        self.heldout, self.pool = pool[: cfg.heldout_prompts], pool[cfg.heldout_prompts:]

        def opt(model, lr):
            return make_optimizer(model, TrainConfig(lr=lr, weight_decay=cfg.weight_decay,
                                                     schedule="constant", device=cfg.device))

        self.policy_opt, self.value_opt = opt(self.policy, cfg.lr), opt(self.value, cfg.value_lr)
        self.iteration, self.best, self.bad_evals = 0, -math.inf, 0
        self.rng = random.Random(cfg.seed)

    # ---------------------------------------------------------------- rollouts
    def respond(self, prompts, temperature: float, seed: int):
        """Prompt ids, new tokens, texts and the generator's log-probs (the shared `reply`)."""
        loaded = checkpoint.Loaded(self.policy, self.tok, self.args, "native", {})
        texts, ids, gen = reply(loaded, [p.dialog for p in prompts], self.cfg.max_new_tokens,
                                temperature, seed)
        return ids, gen.tokens, texts, gen.logprobs

    @torch.no_grad()
    def collect(self, prompts) -> dict:
        cfg = self.cfg
        self.policy.eval()
        ids, responses, texts, gen_logp = self.respond(prompts, cfg.temperature,
                                                       seed=cfg.seed * 100_003 + self.iteration)
        device = self.policy.output.weight.device
        ro = build_rollout(ids, responses, self.tok.pad_id, device)
        # The generator's log-probabilities are the policy's own (temperature 1, no top-p), so
        # no second forward pass is needed for the old policy.
        old_logp = torch.zeros(ro.mask.shape)
        for b, lp in enumerate(gen_logp):
            old_logp[b, : len(lp)] = torch.tensor(lp)
        old_logp = old_logp.to(device)
        ref_logp = response_logprobs(self.ref, ro)
        old_values = response_values(self.value, ro) * ro.mask
        scores = self.scores(prompts, texts)
        # R = WHITEN(LOGIT(Rc)) at the last token, minus beta * KL per token (paper §3.2.3).
        score = whiten(logit(scores["rc"])).to(device)
        kl = (old_logp - ref_logp) * ro.mask
        rewards = -cfg.beta * kl
        last = (ro.mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(prompts), device=device), last] += score
        adv, returns = gae(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, ro.mask)
        stats = {"reward": float(scores["rc"].mean()), "rs": float(scores["rs"].mean()),
                 "rh": float(scores["rh"].mean()), "kl": float(kl.sum(1).mean()),
                 "response_length": float(ro.mask.sum(1).mean()),
                 **{f"{k}_reward": float(v.mean()) for k, v in scores.items() if k in ("proxy", "gold")}}
        return {"ro": ro, "old_logp": old_logp, "old_values": old_values, "adv": adv,
                "returns": returns, "stats": stats}

    def scores(self, prompts, texts: list[str]) -> dict[str, torch.Tensor]:
        """The optimized reward's {"rc", "rs", "rh"}, plus "proxy" and "gold": Rc under the RMs
        and under the annotators (where the prompts are the world's)."""
        args = ([p.dialog for p in prompts], texts, [p.kind == "safety" for p in prompts])
        scores = self.rewards(*args)
        for name, reward in (("proxy", self.proxy), ("gold", self.gold)):
            if reward is not None:
                scores[name] = scores["rc"] if reward is self.rewards else reward(*args)["rc"]
        return scores

    # ---------------------------------------------------------------- update
    def update(self, batch: dict) -> dict:
        cfg = self.cfg
        self.policy.train()
        self.value.train()
        ro: Rollout = batch["ro"]
        n = ro.tokens.shape[0]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0,
                "approx_kl": 0.0}
        steps = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                cfg.seed + self.iteration))
            for s in range(0, n, cfg.minibatch):
                idx = order[s:s + cfg.minibatch]
                mb = Rollout(ro.tokens[idx], ro.index[idx], ro.mask[idx], ro.targets[idx])
                m = mb.mask
                logp, entropy = response_logprobs(self.policy, mb, with_entropy=True)
                ratio = torch.exp(logp - batch["old_logp"][idx])
                adv = batch["adv"][idx]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip))
                policy_loss = masked_mean(pg, m)
                v = response_values(self.value, mb)
                old_v, ret = batch["old_values"][idx], batch["returns"][idx]
                v_clip = old_v + (v - old_v).clamp(-cfg.value_clip, cfg.value_clip)
                value_loss = 0.5 * masked_mean(torch.max((v - ret) ** 2, (v_clip - ret) ** 2), m)
                self.policy_opt.zero_grad(set_to_none=True)
                self.value_opt.zero_grad(set_to_none=True)
                (policy_loss + cfg.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), cfg.grad_clip)
                self.policy_opt.step()
                self.value_opt.step()
                with torch.no_grad():
                    sums["policy_loss"] += float(policy_loss)
                    sums["value_loss"] += float(value_loss)
                    sums["entropy"] += float(masked_mean(entropy, m))
                    sums["clip_frac"] += float(masked_mean(
                        ((ratio - 1).abs() > cfg.clip).float(), m))
                    sums["approx_kl"] += float(masked_mean(batch["old_logp"][idx] - logp, m))
                steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    # ---------------------------------------------------------------- held-out evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy answers to held-out prompts: the optimized reward (early stopping), the proxy
        and gold Rc, and the annotators' helpfulness and violations, so that reward hacking of
        the RMs would show."""
        from llama2.world import Annotator

        self.policy.eval()
        _, _, texts, _ = self.respond(self.heldout, 0.0, seed=0)
        scores = self.scores(self.heldout, texts)
        ann = Annotator(0, noise=False)
        return {"heldout_reward": float(scores["rc"].mean()),
                **{f"heldout_{k}": float(v.mean()) for k, v in scores.items() if k in ("proxy", "gold")},
                "heldout_helpfulness": sum(ann.helpfulness(p, t) for p, t in
                                           zip(self.heldout, texts)) / len(texts),
                "heldout_violation": sum(ann.is_violation(p, t) for p, t in
                                         zip(self.heldout, texts) if p.kind == "safety")
                / max(1, sum(p.kind == "safety" for p in self.heldout))}

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {"iteration": self.iteration, "best": self.best, "bad_evals": self.bad_evals,
                "policy": self.policy.state_dict(), "value": self.value.state_dict(),
                "policy_opt": self.policy_opt.state_dict(),
                "value_opt": self.value_opt.state_dict(), "rng": rng_state(),
                "sampler": self.rng.getstate()}

    def save_state(self) -> None:
        atomic_torch_save(self._state(), self.out / "ppo_state.pt")

    def load_state(self) -> bool:
        path = self.out / "ppo_state.pt"
        if not path.is_file():
            return False
        s = torch.load(path, weights_only=False)
        self.iteration, self.best, self.bad_evals = s["iteration"], s["best"], s["bad_evals"]
        self.policy.load_state_dict(s["policy"])
        self.value.load_state_dict(s["value"])
        self.policy_opt.load_state_dict(s["policy_opt"])
        self.value_opt.load_state_dict(s["value_opt"])
        set_rng_state(s["rng"])
        self.rng.setstate(s["sampler"])
        return True

    @staticmethod
    def _drop_records_after(path: Path, iteration: int) -> None:
        """Keep the log's records up to the saved state's iteration (none at a fresh start)."""
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines()
                    if iteration and _iteration(ln) <= iteration]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def save_best(self) -> None:
        checkpoint.save(self.policy, self.tok, self.out / "best",
                        extra={"stage": "ppo", "iteration": self.iteration, "round": self.cfg.round})

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "ppo_state.pt").is_file() and not cfg.resume:
            raise ValueError(f"{self.out} already holds a PPO run; pass --resume to continue it")
        if cfg.resume:
            self.load_state()
        from llama2.config import save

        save(cfg, self.out / "config.json")
        log = JsonlLogger(self.out / "ppo_metrics.jsonl")
        self._drop_records_after(log.path, self.iteration)  # a killed run's, redone below
        if self.iteration == 0:
            first = self.evaluate()
            self.best = first["heldout_reward"]
            self.save_best()
            log.log({"iteration": 0, **first})
        bar = tqdm(total=cfg.iterations, initial=self.iteration, unit="it", dynamic_ncols=True)
        stopped = self.bad_evals >= cfg.patience  # a resumed run that had stopped early
        while self.iteration < cfg.iterations and not stopped:
            t0 = time.perf_counter()
            prompts = self.rng.sample(self.pool, min(cfg.batch_prompts, len(self.pool)))
            batch = self.collect(prompts)
            t1 = time.perf_counter()
            stats = {**batch["stats"], **self.update(batch)}
            self.iteration += 1
            record = {"iteration": self.iteration, **stats, "rollout_s": t1 - t0,
                      "update_s": time.perf_counter() - t1}
            if self.iteration % cfg.eval_every == 0 or self.iteration == cfg.iterations:
                ev = self.evaluate()
                record.update(ev)
                if ev["heldout_reward"] > self.best:
                    self.best, self.bad_evals = ev["heldout_reward"], 0
                    self.save_best()
                else:
                    self.bad_evals += 1
                    stopped = self.bad_evals >= cfg.patience  # early stopping (paper §3.2.3)
            log.log(record)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            if cfg.save_every and self.iteration % cfg.save_every == 0:
                self.save_state()
        bar.close()
        self.save_state()
        # The final model is the best held-out checkpoint.
        best = checkpoint.load(self.out / "best")
        summary = {"iterations": self.iteration, "best_heldout_reward": self.best,
                   "early_stopped": stopped, "best_iteration": best.extra.get("iteration")}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        # The model last: its config.json marks a finished stage (stage_done).
        checkpoint.save(best.model, self.tok, self.out / "model",
                        extra={**best.extra, "early_stopped": stopped})
        return summary


def _iteration(line: str) -> float:
    try:
        return json.loads(line).get("iteration", 0)
    except json.JSONDecodeError:  # a line cut short by a kill
        return float("inf")


def main(argv: list[str]) -> None:
    cfg: PPOConfig = parse_stage(PPOConfig, argv, "ppo")
    summary = PPO(cfg).run()
    print(json.dumps(summary, indent=2))
    print(f"model written to {Path(cfg.out) / 'model'}")
