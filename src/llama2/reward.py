"""Reward models (recipe §4, paper §3.2.2): the Llama 2 model with its next-token head replaced
by a scalar head, and the one scoring API every later stage shares.

Input: the dialog context plus the response, in the chat format (`encode_dialog` of the dialog
with the response as the last assistant turn); the score is read at the last token (the EOS
that closes the answer). Scores are logits; `torch.sigmoid(score)` is the probability form the
PPO reward and the safety threshold use (recipe §6).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama2.chat import Dialog, encode_dialog, end_at_special_tag
from llama2.model import ModelArgs, Transformer
from llama2.rlhf_math import SAFETY_THRESHOLD, piecewise
from llama2.tokenizer import Tokenizer
from llama2.utils import atomic_write, atomic_write_text

REWARD_MARKER = "llama2_reward"


class RewardModel(nn.Module):
    def __init__(self, transformer: Transformer):
        super().__init__()
        self.transformer = transformer
        # The next-token head is dropped; a scalar regression head takes its place. Zero init:
        # every response starts at score 0, so the first updates come from the ranking loss.
        transformer.output = nn.Identity()  # type: ignore[assignment]
        self.score_head = nn.Linear(transformer.args.dim, 1)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    @property
    def args(self) -> ModelArgs:
        return self.transformer.args

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Scores [B] of right-padded sequences tokens [B, T] read at index `last` [B]."""
        h = self.transformer.hidden(tokens)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        return self.score_head(h_last).squeeze(-1).float()

    def forward_pairs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (chosen [N], rejected [N]) of preference pairs packed by `pack_pairs`."""
        h = self.transformer.hidden(batch["tokens"], positions=batch["positions"],
                                    mask=batch["mask"], slots=batch["slots"])
        scores = self.score_head(h[0, batch["read"]]).squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        return chosen.clone(), rejected.clone()  # not views (FSDP2 hooks the outputs)

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """A score at every position [B, T]: the PPO value head reads the RM this way."""
        scores = self.score_head(self.transformer.hidden(tokens)).squeeze(-1).float()
        return scores.clone()  # not a view (FSDP2 hooks the outputs)


def from_policy(policy: Transformer) -> RewardModel:
    """Initialize a reward model from a chat/SFT checkpoint (paper §3.2.2)."""
    return RewardModel(policy)


def save_reward_model(rm: RewardModel, tokenizer: Tokenizer | None, folder: str | os.PathLike,
                      kind: str, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in rm.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    meta = {"format": REWARD_MARKER, "kind": kind, "model_args": rm.args.to_dict(),
            "extra": extra or {}}
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=2) + "\n")
    return folder


def load_reward_model(folder: str | os.PathLike, device: str | torch.device = "cpu"
                      ) -> tuple[RewardModel, Tokenizer, dict]:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no reward model here (config.json missing)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != REWARD_MARKER:
        raise ValueError(f"{folder}: not a reward model (format {meta.get('format')!r})")
    rm = RewardModel(Transformer(ModelArgs(**meta["model_args"])))
    rm.load_state_dict(load_file(folder / "model.safetensors"))
    tok = Tokenizer(folder / "tokenizer.model")
    return rm.to(device).eval(), tok, meta


def encode_scored(tok: Tokenizer, dialog: Dialog, response: str, max_len: int) -> list[int]:
    """Context + response in the chat format, cut from the left to fit `max_len` (the answer
    matters; 0 keeps it whole). A sampled response is scored up to its first chat tag, where
    the policy started a new turn: a forged turn can neither fool the RM nor stop the run."""
    response = end_at_special_tag(response)
    ids, _ = encode_dialog(tok, list(dialog) + [{"role": "assistant", "content": response}],
                           learn="none")
    return ids[-max_len:] if max_len else ids


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) - 1 for s in seqs])


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common start of two sequences, leaving each at least its last token."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pack_pairs(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Pack (chosen, rejected) sequences so that each pair's shared context is computed once.

    Both responses of a pair follow the same dialog context, so a pair becomes one segment
    `chosen + rejected[c:]`, c the length of their common prefix: the rejected part attends to
    the context (the segment's first c tokens) and to itself, not to the chosen response, and
    its rotary positions continue from c, so each token sees exactly what it would see in its
    own sequence. A pair with nothing in common (contexts cut from the left differently) is two
    segments. The tokens go unpadded through the model; only attention lays them out in rows
    (segments packed first-fit-decreasing into rows as long as the longest segment).

    Returns tokens and positions [1, N] (N = the segments' tokens), `slots` [N]: each token's
    flat index in the [R, T] attention layout, the boolean attention mask [R, 1, T, T] (True =
    attend; a padding slot attends only to itself), and `read` [2 * pairs]: the index of the
    last token of each chosen, then each rejected sequence (`RewardModel.forward_pairs`).
    """
    n = len(pairs)
    # A segment is a list of parts (tokens, first position, read slot); a part starting at
    # position p > 0 also attends to the first p tokens of its segment.
    segments: list[list[tuple[list[int], int, int]]] = []
    for i, (chosen, rejected) in enumerate(pairs):
        c = shared_prefix(chosen, rejected)
        if c:
            segments.append([(chosen, 0, i), (rejected[c:], c, n + i)])
        else:
            segments += [[(chosen, 0, i)], [(rejected, 0, n + i)]]

    def length(seg):
        return sum(len(part) for part, _, _ in seg)

    T = max(length(s) for s in segments)
    rows: list[list] = []
    for seg in sorted(segments, key=length, reverse=True):
        row = next((r for r in rows if sum(map(length, r)) + length(seg) <= T), None)
        if row is None:
            rows.append([seg])
        else:
            row.append(seg)

    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    read = [0] * (2 * n)
    # In the layout, a query attends to keys lo..itself and to the prefix keys plo..phi-1.
    lo = torch.arange(T).repeat(len(rows), 1)
    plo, phi = torch.zeros_like(lo), torch.zeros_like(lo)
    for r, row in enumerate(rows):
        at = 0
        for seg in row:
            seg_start = at
            for part, first, slot in seg:
                end = at + len(part)
                tokens += part
                positions += range(first, first + len(part))
                slots += range(r * T + at, r * T + end)
                read[slot] = len(tokens) - 1
                lo[r, at:end] = at
                plo[r, at:end], phi[r, at:end] = seg_start, seg_start + first
                at = end
    q = torch.arange(T).view(1, T, 1)
    k = torch.arange(T).view(1, 1, T)
    mask = ((k >= lo.unsqueeze(2)) & (k <= q)) | ((k >= plo.unsqueeze(2)) & (k < phi.unsqueeze(2)))
    return {"tokens": torch.tensor([tokens]), "positions": torch.tensor([positions]),
            "slots": torch.tensor(slots), "mask": mask.unsqueeze(1), "read": torch.tensor(read)}


@torch.no_grad()
def score(rm: RewardModel, tok: Tokenizer, dialogs: list[Dialog], responses: list[str],
          batch_size: int = 32) -> torch.Tensor:
    """Scores (logits) [N] of each response in its dialog context, batched.

    Under torchrun (every rank calls it with the same inputs) the batches are dealt out over
    the ranks and the scores gathered: each batch holds what it holds in one process, so the
    scores are the one-process run's to the bit. A sharded RM scores every batch on every rank
    (its forward is a collective)."""
    from llama2.engine import distributed

    if len(dialogs) != len(responses):
        raise ValueError(f"{len(dialogs)} dialogs but {len(responses)} responses")
    device = rm.score_head.weight.device
    was_training = rm.training
    rm.eval()
    seqs = [encode_scored(tok, d, r, rm.args.max_seq_len) for d, r in zip(dialogs, responses)]
    # Sort by length so each batch pads little; restore the order at the end.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    info = distributed.current()
    if distributed.is_sharded(rm):
        info = distributed.DistInfo()
    out = torch.empty(len(seqs))
    for idx in batches[info.rank::info.world_size]:
        tokens, last = pad_right([seqs[i] for i in idx], tok.pad_id)
        out[idx] = rm(tokens.to(device), last.to(device)).cpu()
    if info.distributed:
        mine = [i for idx in batches[info.rank::info.world_size] for i in idx]
        got = distributed.gather_shares([(i, float(out[i])) for i in mine], len(seqs), info)
        out = torch.tensor(got, dtype=out.dtype)
    rm.train(was_training)
    return out


PolicyTokenizer = Tokenizer | str | os.PathLike | None  # a tokenizer, or a checkpoint's


def check_tokenizer(folder: str | os.PathLike, tok: Tokenizer, policy: PolicyTokenizer) -> None:
    """The reward model at `folder` (tokenizer `tok`) must read the policy's tokens: the same
    SentencePiece model, byte for byte (the paper initializes RMs from the chat model; PPO's
    value model reads the policy's token ids). `policy`: its tokenizer, or a checkpoint path
    ("PATH#fmt" too) whose tokenizer.model to compare with; None checks nothing. Every rank
    loads the RMs, so a mismatch is a one-line LaunchError."""
    from llama2.checkpoint import tokenizer_path
    from llama2.engine.distributed import LaunchError

    if policy is None:
        return
    if not isinstance(policy, Tokenizer):
        path = tokenizer_path(policy)
        if path is None:  # a checkpoint without its own tokenizer: nothing to compare with
            return
        policy = Tokenizer(path)
    if tok.model_proto != policy.model_proto:
        raise LaunchError(f"{folder}: the reward model's tokenizer ({tok.n_words} pieces) is not "
                          f"the policy's ({policy.n_words} pieces); train the reward model from "
                          "the policy's checkpoint (or its SFT model)")


class Scorer:
    """A reward model loaded from disk, called as `scorer(dialogs, responses)`; with `policy`
    (a tokenizer or checkpoint path) it must share the policy's tokenizer (`check_tokenizer`)."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 policy: PolicyTokenizer = None):
        self.rm, self.tok, self.meta = load_reward_model(folder, device)
        check_tokenizer(folder, self.tok, policy)
        self.kind: str = self.meta.get("kind", "helpfulness")

    def __call__(self, dialogs: list[Dialog], responses: list[str]) -> torch.Tensor:
        return score(self.rm, self.tok, dialogs, responses)


# ------------------------------------------------------------------ the two-RM reward (§6)
class TwoRewardModels:
    """The Helpfulness and Safety RMs behind one call: probabilities Rs, Rh and the piecewise Rc
    (`rlhf_math.piecewise`).

    Rejection sampling ranks samples by Rc; PPO whitens LOGIT(Rc) (paper §3.2.3). Both RMs
    read one tokenizer: the policy's (`policy`, see `check_tokenizer`), or without it each
    other's."""

    def __init__(self, helpful: str | os.PathLike, safety: str | os.PathLike,
                 device: str | torch.device = "cpu", threshold: float = SAFETY_THRESHOLD,
                 safety_switch: bool = True, policy: PolicyTokenizer = None):
        self.helpful = Scorer(helpful, device, policy)
        self.safety = Scorer(safety, device, policy or self.helpful.tok)
        self.threshold, self.safety_switch = threshold, safety_switch

    def __call__(self, dialogs: list[Dialog], responses: list[str], is_safety: list[bool]
                 ) -> dict[str, torch.Tensor]:
        rh = torch.sigmoid(self.helpful(dialogs, responses))
        rs = torch.sigmoid(self.safety(dialogs, responses))
        rc = piecewise(rs, rh, torch.tensor(is_safety), self.threshold, self.safety_switch)
        return {"rc": rc, "rs": rs, "rh": rh}


# ------------------------------------------------------------- the gold reward (annotators)
REWARDS = ("rm", "annotator")  # what rejection sampling and PPO optimize


class AnnotatorReward:
    """The world's annotators (label noise off) as a reward, called like `TwoRewardModels`:
    Rh and Rs are their helpfulness and safety scores in [0, 1], Rc the same piecewise rule.

    This is the gold reward of Gao et al. 2022 ("Scaling laws for reward model
    overoptimization"): rejection sampling and PPO log it beside the RMs' (proxy) reward, and a
    gold-reward run (`reward = "annotator"`) optimizes it instead, the ceiling the optimizer
    reaches with a perfect judge. It judges only world prompts (the annotators read the prompt
    record's metadata, never the policy)."""

    def __init__(self, prompts: list, threshold: float = SAFETY_THRESHOLD,
                 safety_switch: bool = True):
        from llama2.world import Annotator

        self.annotator = Annotator(0, noise=False)
        self.prompts = {_dialog_key(p.dialog): p for p in prompts if p.meta.get("split")}
        self.threshold, self.safety_switch = threshold, safety_switch

    def judges(self, dialogs: list[Dialog]) -> bool:
        return all(_dialog_key(d) in self.prompts for d in dialogs)

    def __call__(self, dialogs: list[Dialog], responses: list[str], is_safety: list[bool]
                 ) -> dict[str, torch.Tensor]:
        if not self.judges(dialogs):
            raise ValueError("the annotators judge only the world's prompts; prompts read from "
                             "files have no gold reward (use reward = \"rm\")")
        prompts = [self.prompts[_dialog_key(d)] for d in dialogs]
        rh = torch.tensor([self.annotator.helpfulness(p, r) for p, r in zip(prompts, responses)])
        rs = torch.tensor([self.annotator.safety(p, r) for p, r in zip(prompts, responses)])
        rc = piecewise(rs, rh, torch.tensor(is_safety), self.threshold, self.safety_switch)
        return {"rc": rc, "rs": rs, "rh": rh}


def _dialog_key(dialog: Dialog) -> str:
    return json.dumps(dialog, sort_keys=True)


def proxy_and_gold(kind: str, helpful_rm: str, safety_rm: str, prompts: list,
                   device: str | torch.device = "cpu", safety_switch: bool = True,
                   policy: PolicyTokenizer = None):
    """(the reward to optimize, the RMs' proxy reward, the annotators' gold reward or None where
    a prompt is not the world's) for reward `kind` ("rm" or "annotator"); `policy`: the
    policy's tokenizer, which the RMs must share (`check_tokenizer`)."""
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    gold = AnnotatorReward(prompts, safety_switch=safety_switch)
    if not gold.judges([p.dialog for p in prompts]):
        if kind == "annotator":
            raise ValueError("reward = \"annotator\" needs world prompts (prompts = [\"world\"])")
        gold = None
    proxy = TwoRewardModels(helpful_rm, safety_rm, device=device, safety_switch=safety_switch,
                            policy=policy)
    return (gold if kind == "annotator" else proxy), proxy, gold
