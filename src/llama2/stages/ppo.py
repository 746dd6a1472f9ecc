"""PPO with the two-RM reward and the KL penalty (recipe §6, paper §3.2.3).

Maximizes E[R(g | p)] with R(g | p) = WHITEN(LOGIT(Rc(g | p))) - beta * KL(pi || pi_0), where
Rc = Rs if IS_SAFETY(p) or Rs < 0.15 else Rh. The KL term is charged per token against the
frozen initial policy pi_0; the whitened score is added at the last token. Advantages by GAE;
clipped policy and value losses; one gradient step per minibatch; AdamW (0.9, 0.95, 1e-5),
weight decay 0.1, gradient clipping 1.0, constant LR; early stopping on held-out prompts.

The value function is a separate model initialized from the Helpfulness RM (its scalar head
read at every position), as InstructGPT does: it starts out knowing what a good answer is.

The math (the reward, KL penalty, GAE, whitening, the clipped losses) is `llama2.rlhf_math`.
The loop is PPO's own (two models; rollouts, then updates), built from the engine's pieces the
Trainer uses too: `ModelOptimizer` per model (AdamW, constant schedule, clipping, the step),
`checkpointing` (prepare, atomic write with the RNG states and keep-N, read) and `MetricsLog`
(ppo_metrics.jsonl, records past a resumed checkpoint dropped).

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
from llama2.engine import MetricsLog, ModelOptimizer, TrainConfig, checkpointing
from llama2.respond import respond
from llama2.reward import RewardModel, load_reward_model, proxy_and_gold
from llama2.rlhf_math import (
    gae,
    kl_penalized_rewards,
    masked_mean,
    normalized_reward,
    policy_loss,
    value_loss,
    whiten,
)
from llama2.stages.common import load_policy, parse_stage
from llama2.stages.rejection_sampling import load_prompts
from llama2.utils import atomic_write_text, seed_everything


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
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    device: str = "auto"

    def train_config(self, lr: float) -> TrainConfig:
        """The engine's settings for one of the two models: AdamW (0.9, 0.95, 1e-5), weight
        decay, clipping, a constant LR without warmup (paper §3.2.3)."""
        return TrainConfig(lr=lr, schedule="constant", warmup_steps=0,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           device=self.device)


# ------------------------------------------------------------------------- the pieces
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

        self.policy_opt = ModelOptimizer(self.policy, cfg.train_config(cfg.lr))
        self.value_opt = ModelOptimizer(self.value, cfg.train_config(cfg.value_lr))
        self.iteration, self.best, self.bad_evals = 0, -math.inf, 0
        self.rng = random.Random(cfg.seed)

    # ---------------------------------------------------------------- rollouts
    @torch.no_grad()
    def collect(self, prompts) -> dict:
        cfg = self.cfg
        self.policy.eval()
        # Prompt ids (fitted), new tokens, texts as generated (the RMs end them at a chat tag)
        # and the generator's log-probs.
        answers = respond(self.policy, self.tok, [p.dialog for p in prompts], cfg.max_new_tokens,
                          temperature=cfg.temperature, seed=cfg.seed * 100_003 + self.iteration,
                          logprobs=True, end_at_tag=False)
        ids, responses = [a.prompt for a in answers], [a.tokens for a in answers]
        texts, gen_logp = [a.text for a in answers], [a.logprobs for a in answers]
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
        score = normalized_reward(scores["rc"]).to(device)
        rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, ro.mask, cfg.beta)
        adv, returns = gae(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, ro.mask)
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
                pl, ratio = policy_loss(logp, batch["old_logp"][idx], batch["adv"][idx], m,
                                        cfg.clip)
                vl = value_loss(response_values(self.value, mb), batch["old_values"][idx],
                                batch["returns"][idx], m, cfg.value_clip)
                (pl + cfg.vf_coef * vl).backward()
                # Each model its own clipping and AdamW step (the engine's, as the Trainer's).
                self.policy_opt.step()
                self.value_opt.step()
                with torch.no_grad():
                    sums["policy_loss"] += float(pl)
                    sums["value_loss"] += float(vl)
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
        texts = respond(self.policy, self.tok, [p.dialog for p in self.heldout],
                        self.cfg.max_new_tokens, end_at_tag=False)
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
    def save_checkpoint(self) -> None:
        """checkpoints/step_<iteration>.pt through the engine (atomic, `latest`, keep-N):
        both models with their optimizers and schedules, the RNG states, the prompt
        sampler and the early-stopping state."""
        payload = {"step": self.iteration, "policy": self.policy_opt.state_dict(),
                   "value": self.value_opt.state_dict(), "rng": checkpointing.rng_states(),
                   "sampler": self.rng.getstate(), "best": self.best,
                   "bad_evals": self.bad_evals}
        checkpointing.write(self.out, self.iteration, payload, self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        s = checkpointing.read(path)
        self.policy_opt.load_state_dict(s["policy"])
        self.value_opt.load_state_dict(s["value"])
        checkpointing.set_rng_states(s["rng"])
        self.rng.setstate(s["sampler"])
        self.iteration, self.best, self.bad_evals = int(s["step"]), s["best"], s["bad_evals"]

    def save_best(self) -> None:
        checkpoint.save(self.policy, self.tok, self.out / "best",
                        extra={"stage": "ppo", "iteration": self.iteration, "round": self.cfg.round})

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        start = checkpointing.prepare(self.out, cfg.resume)
        if start is not None:
            self.load_checkpoint(start)
        from llama2.config import save

        save(cfg, self.out / "config.json")
        log = MetricsLog(self.out / "ppo_metrics.jsonl", key="iteration")
        log.restart(self.iteration if start is not None else None)  # a killed run's, redone
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
                self.save_checkpoint()
        bar.close()
        if checkpointing.latest(self.out) != checkpointing.checkpoint_path(self.out,
                                                                            self.iteration):
            self.save_checkpoint()
        # The final model is the best held-out checkpoint.
        best = checkpoint.load(self.out / "best")
        summary = {"iterations": self.iteration, "best_heldout_reward": self.best,
                   "early_stopped": stopped, "best_iteration": best.extra.get("iteration")}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        # The model last: its config.json marks a finished stage (stage_done).
        checkpoint.save(best.model, self.tok, self.out / "model",
                        extra={**best.extra, "early_stopped": stopped})
        return summary


def main(argv: list[str]) -> None:
    cfg: PPOConfig = parse_stage(PPOConfig, argv, "ppo")
    summary = PPO(cfg).run()
    print(json.dumps(summary, indent=2))
    print(f"model written to {Path(cfg.out) / 'model'}")
