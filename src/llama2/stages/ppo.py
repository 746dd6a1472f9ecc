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

Under torchrun every rank runs the same loop (the rule in engine/distributed.py; one process
is the same code with W = 1). The policy and the value model are FSDP2-sharded, each with its
optimizer; the reference policy and both RMs are replicated or sharded (`frozen`).
`batch_prompts` and `minibatch` are global sizes: the rollouts are generated and scored split
over the ranks (`respond`, `reward.score`; each prompt its own seeded stream), each rank
computes log-probs, values and advantages for its parts of the minibatches, with the whole
batch's whitening and statistics (all-reduces, `rlhf_math.whiten(total=...)`), and a step's
gradient is the ranks' shares summed: the one-process curves to float tolerance. Rank 0 writes
and logs; the held-out evaluation is rank 0's on every rank, so early stopping is decided once.

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
from llama2.engine import MetricsLog, ModelOptimizer, TrainConfig, checkpointing, distributed
from llama2.plan import FROZEN
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
    frozen: str = "replicated"  # pi_0 and both RMs under torchrun: whole on each rank, or "sharded"

    def check_world(self, world_size: int, where: str = "") -> None:
        """`frozen` must be known, and the global `batch_prompts` and `minibatch` must split
        evenly over `world_size` processes; else a one-line LaunchError naming the field
        (`where`: the section's dotted path, e.g. "rlhf.ppo")."""
        prefix = f"{where}." if where else ""
        if self.frozen not in FROZEN:
            raise distributed.LaunchError(f"{prefix}frozen: expected one of {FROZEN}, got "
                                          f"{self.frozen!r}")
        for name in ("batch_prompts", "minibatch"):
            if getattr(self, name) % world_size:
                raise distributed.LaunchError(
                    f"{prefix}{name} {getattr(self, name)}: a global size that does not split "
                    f"over {world_size} processes; make it a multiple of {world_size}")

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
        self.info = info = distributed.init(cfg.device)  # idempotent: parse_stage made it
        cfg.check_world(info.world_size)
        seed_everything(cfg.seed)
        loaded = load_policy(cfg.model, str(info.device))
        self.policy, self.tok, self.args = loaded.model, loaded.tokenizer, loaded.args
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)  # pi_0, frozen
        self.value, _, _ = load_reward_model(cfg.helpful_rm, info.device)
        pool = load_prompts(cfg.prompts, cfg.world_seed, cfg.n_prompts + cfg.heldout_prompts,
                            cfg.safety_share, cfg.round, cfg.borderline_share,
                            on_special_tags=cfg.on_special_tags)
        self.rewards, self.proxy, self.gold = proxy_and_gold(
            cfg.reward, cfg.helpful_rm, cfg.safety_rm, pool, info.device, cfg.safety_switch,
            policy=self.tok)
        random.Random(cfg.seed).shuffle(pool)
        self.heldout, self.pool = pool[: cfg.heldout_prompts], pool[cfg.heldout_prompts:]
        self.batch = min(cfg.batch_prompts, len(self.pool))  # a pool smaller than a batch: all
        if self.batch % info.world_size:
            raise distributed.LaunchError(
                f"n_prompts {cfg.n_prompts}: the pool of {len(self.pool)} prompts, the batch, "
                f"does not split over {info.world_size} processes")
        if info.distributed:
            # The trained models: each rank holds 1/W of their weights, gradients and AdamW.
            distributed.shard_model(self.policy, info)
            distributed.shard_model(self.value, info, ("hidden", "values"))
            if cfg.frozen == "sharded":
                for model in (self.ref, self.proxy.helpful.rm, self.proxy.safety.rm):
                    distributed.shard_model(model, info)

        self.policy_opt = ModelOptimizer(self.policy, cfg.train_config(cfg.lr))
        self.value_opt = ModelOptimizer(self.value, cfg.train_config(cfg.value_lr))
        self.iteration, self.best, self.bad_evals = 0, -math.inf, 0
        self.rng = random.Random(cfg.seed)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks: what makes a share's statistics the batch's."""
        return distributed.all_reduce_tensor(t, self.info)

    def minibatches(self, n: int) -> list[tuple[list[int], list[int]]]:
        """(rows, this rank's rows) of each minibatch of a batch of n: the one-process run's
        minibatches (a seeded permutation cut every `minibatch` rows; the same each epoch),
        each dealt out in W equal contiguous parts, so that the ranks' gradients, summed,
        are the one-process step's."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.cfg.seed + self.iteration)).tolist()
        rank, world = self.info.rank, self.info.world_size
        out = []
        for s in range(0, n, self.cfg.minibatch):
            rows = order[s:s + self.cfg.minibatch]
            k = len(rows) // world  # batch and minibatch are multiples of W: so is the rest
            out.append((rows, rows[rank * k:(rank + 1) * k]))
        return out

    # ---------------------------------------------------------------- rollouts
    @torch.no_grad()
    def collect(self, prompts) -> dict:
        """The rollouts of a batch: every rank generates and scores a share of the prompts
        (`respond`, `score`) and holds every answer and reward; log-probs, values, advantages
        are computed for this rank's rows (its parts of the minibatches, in minibatch order),
        whitened with the whole batch's moments."""
        cfg, info = self.cfg, self.info
        self.policy.eval()
        # Prompt ids (fitted), new tokens, texts as generated (the RMs end them at a chat tag)
        # and the generator's log-probs; each prompt its own seeded stream (any rank count).
        answers = respond(self.policy, self.tok, [p.dialog for p in prompts], cfg.max_new_tokens,
                          temperature=cfg.temperature, seed=cfg.seed * 100_003 + self.iteration,
                          logprobs=True, end_at_tag=False)
        n = len(answers)
        parts = self.minibatches(n)
        mine = [i for _, rows in parts for i in rows]
        ro = build_rollout([answers[i].prompt for i in mine], [answers[i].tokens for i in mine],
                           self.tok.pad_id, info.device)
        # The generator's log-probabilities are the policy's own (temperature 1, no top-p), so
        # no second forward pass is needed for the old policy.
        old_logp = torch.zeros(ro.mask.shape)
        for b, i in enumerate(mine):
            old_logp[b, : len(answers[i].logprobs)] = torch.tensor(answers[i].logprobs)
        old_logp = old_logp.to(info.device)
        ref_logp = response_logprobs(self.ref, ro)
        old_values = response_values(self.value, ro) * ro.mask
        scores = self.scores(prompts, [a.text for a in answers])  # the whole batch's
        # R = WHITEN(LOGIT(Rc)) at the last token, minus beta * KL per token (paper §3.2.3).
        score = normalized_reward(scores["rc"])[mine].to(info.device)
        rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, ro.mask, cfg.beta)
        adv, returns = gae(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, ro.mask, total=self.total)
        stats = {"reward": float(scores["rc"].mean()), "rs": float(scores["rs"].mean()),
                 "rh": float(scores["rh"].mean()),
                 "kl": distributed.all_reduce_sum([float(kl.sum())], info)[0] / n,
                 "response_length": sum(len(a.tokens) for a in answers) / n,
                 **{f"{k}_reward": float(v.mean()) for k, v in scores.items() if k in ("proxy", "gold")}}
        # Each minibatch: this rank's rows (a slice of the rollout) and the minibatch's valid
        # tokens on all ranks, the count its losses are means over.
        sizes = [len(rows) for _, rows in parts]
        counts = [sum(len(answers[i].tokens) for i in rows) for rows, _ in parts]
        return {"ro": ro, "old_logp": old_logp, "old_values": old_values, "adv": adv,
                "returns": returns, "stats": stats, "sizes": sizes, "counts": counts}

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
        """One gradient step per minibatch: each rank's losses are its share of the minibatch's
        token means, so the ranks' gradients add up to the one-process step's."""
        cfg, info = self.cfg, self.info
        self.policy.train()
        self.value.train()
        ro: Rollout = batch["ro"]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0,
                "approx_kl": 0.0}
        norms = {"grad_norm": 0.0, "value_grad_norm": 0.0}  # the whole gradient's, every rank
        steps = 0
        for _ in range(cfg.ppo_epochs):
            start = 0
            for size, count in zip(batch["sizes"], batch["counts"]):
                idx = slice(start, start + size)
                start += size
                mb = Rollout(ro.tokens[idx], ro.index[idx], ro.mask[idx], ro.targets[idx])
                m, old_logp = mb.mask, batch["old_logp"][idx]
                logp, entropy = response_logprobs(self.policy, mb, with_entropy=True)
                pl, ratio = policy_loss(logp, old_logp, batch["adv"][idx], m, cfg.clip, count)
                vl = value_loss(response_values(self.value, mb), batch["old_values"][idx],
                                batch["returns"][idx], m, cfg.value_clip, count)
                (pl + cfg.vf_coef * vl).backward()
                # Each model its own clipping and AdamW step (the engine's, as the Trainer's);
                # FSDP averages the ranks' gradients, the step wants their sum: times W.
                stepped = (self.policy_opt.step(grad_scale=info.world_size),
                           self.value_opt.step(grad_scale=info.world_size))
                for key, out in zip(norms, stepped):
                    norms[key] += out["grad_norm"]
                with torch.no_grad():
                    sums["policy_loss"] += float(pl)
                    sums["value_loss"] += float(vl)
                    sums["entropy"] += float(masked_mean(entropy, m, count))
                    sums["clip_frac"] += float(masked_mean(
                        ((ratio - 1).abs() > cfg.clip).float(), m, count))
                    sums["approx_kl"] += float(masked_mean(old_logp - logp, m, count))
                steps += 1
        totals = dict(zip(sums, distributed.all_reduce_sum(list(sums.values()), info)))
        return {k: v / max(steps, 1) for k, v in {**totals, **norms}.items()}

    # ---------------------------------------------------------------- held-out evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy answers to held-out prompts: the optimized reward (early stopping), the proxy
        and gold Rc, and the annotators' helpfulness and violations, so that reward hacking of
        the RMs would show. Rank 0's numbers on every rank: the stopping decision is one."""
        from llama2.world import Annotator

        self.policy.eval()
        texts = respond(self.policy, self.tok, [p.dialog for p in self.heldout],
                        self.cfg.max_new_tokens, end_at_tag=False)
        scores = self.scores(self.heldout, texts)
        ann = Annotator(0, noise=False)
        result = {"heldout_reward": float(scores["rc"].mean()),
                  **{f"heldout_{k}": float(v.mean()) for k, v in scores.items() if k in ("proxy", "gold")},
                  "heldout_helpfulness": sum(ann.helpfulness(p, t) for p, t in
                                             zip(self.heldout, texts)) / len(texts),
                  "heldout_violation": sum(ann.is_violation(p, t) for p, t in
                                           zip(self.heldout, texts) if p.kind == "safety")
                  / max(1, sum(p.kind == "safety" for p in self.heldout))}
        return distributed.broadcast_object(result, self.info)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """checkpoints/step_<iteration>.pt through the engine (atomic, `latest`, keep-N):
        both models with their optimizers and schedules (full state, gathered from every
        rank), every rank's RNG states, the prompt sampler and the early-stopping state;
        rank 0 writes it."""
        payload = {"step": self.iteration, "policy": self.policy_opt.state_dict(),
                   "value": self.value_opt.state_dict(),
                   "rng": checkpointing.rng_states(self.info), "sampler": self.rng.getstate(),
                   "best": self.best, "bad_evals": self.bad_evals}
        if self.info.is_main:
            checkpointing.write(self.out, self.iteration, payload, self.cfg.keep_checkpoints)
        distributed.barrier(self.info)

    def load_checkpoint(self, path: Path) -> None:
        s = checkpointing.read(path)
        self.policy_opt.load_state_dict(s["policy"])
        self.value_opt.load_state_dict(s["value"])
        checkpointing.set_rng_states(s["rng"], self.info.rank, self.info.world_size)
        self.rng.setstate(s["sampler"])
        self.iteration, self.best, self.bad_evals = int(s["step"]), s["best"], s["bad_evals"]

    def save_best(self) -> None:
        policy = distributed.gathered(self.policy)  # whole on every rank (a collective)
        if self.info.is_main:
            checkpoint.save(policy, self.tok, self.out / "best", extra={
                "stage": "ppo", "iteration": self.iteration, "round": self.cfg.round})
        distributed.barrier(self.info)

    def per_rank(self) -> list[dict]:
        """Bytes of the trained models' parameters and AdamW moments each rank holds."""
        mine = distributed.held_bytes([self.policy, self.value],
                                      [self.policy_opt.optimizer, self.value_opt.optimizer])
        return distributed.all_gather_object(mine, self.info)

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, info = self.cfg, self.info
        start = checkpointing.prepare(self.out, cfg.resume, info.is_main)
        distributed.barrier(info)  # rank 0 has made the folder and cleared a killed writer's
        if start is not None:
            self.load_checkpoint(start)
        from llama2.config import save

        save(cfg, self.out / "config.json")
        log = MetricsLog(self.out / "ppo_metrics.jsonl", key="iteration")
        if info.is_main:
            log.restart(self.iteration if start is not None else None)  # a killed run's, redone
        if self.iteration == 0:
            first = self.evaluate()
            self.best = first["heldout_reward"]
            self.save_best()
            if info.is_main:
                log.log({"iteration": 0, **first})
        bar = tqdm(total=cfg.iterations, initial=self.iteration, unit="it", dynamic_ncols=True,
                   disable=not info.is_main)
        stopped = self.bad_evals >= cfg.patience  # a resumed run that had stopped early
        while self.iteration < cfg.iterations and not stopped:
            t0 = time.perf_counter()
            prompts = self.rng.sample(self.pool, self.batch)
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
            if info.is_main:
                log.log(record)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            if cfg.save_every and self.iteration % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        last = checkpointing.checkpoint_path(self.out, self.iteration)
        # Rank 0's view of the folder decides: saving is a collective.
        if distributed.broadcast_object(checkpointing.latest(self.out) != last, info):
            self.save_checkpoint()
        # The final model is the best held-out checkpoint.
        best = checkpoint.load(self.out / "best") if info.is_main else None
        summary = {"iterations": self.iteration, "best_heldout_reward": self.best,
                   "early_stopped": stopped, "best_iteration": distributed.broadcast_object(
                       best.extra.get("iteration") if best else None, info),
                   "world_size": info.world_size, "per_rank": self.per_rank()}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if best is not None:  # the model last: its config.json marks a finished stage
            checkpoint.save(best.model, self.tok, self.out / "model",
                            extra={**best.extra, "early_stopped": stopped})
        distributed.barrier(info)
        return summary


def main(argv: list[str]) -> None:
    cfg: PPOConfig = parse_stage(PPOConfig, argv, "ppo")
    summary = PPO(cfg).run()
    print(json.dumps(summary, indent=2))
    print(f"model written to {Path(cfg.out) / 'model'}")
