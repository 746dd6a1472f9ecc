"""Batched, KV-cached sampling: the one generator that chat, serving, rejection sampling, PPO
rollouts, Ghost Attention, distillation and evaluation all use.

Prompts of different lengths are left-padded into one batch; each row keeps its own rotary
positions and a padding mask, so a row's tokens are exactly what it would get alone. Rows that
finish (EOS or a stop rule) leave the batch, so the remaining steps cost less. Per step the
Python work is one forward of the new tokens, the sampling and the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama2.model import Screen, Transformer, causal_padding_mask, inference_copies, screen_weight


@dataclass
class Generation:
    """New tokens per prompt, their log-probabilities under the model (temperature 1, before
    top-k/top-p: the policy's own probability, what PPO and rejection sampling need; empty lists
    when not asked for), and whether each row stopped on EOS or a stop rule (True) or ran out
    of tokens (False)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def _per_row(value: float | Sequence[float], n: int, name: str) -> torch.Tensor:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} prompts")
    return torch.tensor(values).view(n, 1)


def greedy(logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """argmax over the last dimension of logits [B, V], the first maximum on ties as
    `torch.argmax`: on CPU argmax scans a row one element at a time (16 x 32k logits: 0.43
    ms), so find the chunk that holds the first maximum with a vectorized `amax` and scan only
    that chunk (0.05 ms)."""
    B, V = logits.shape
    if V % chunk or logits.device.type != "cpu":
        return logits.argmax(-1)
    chunks = logits.view(B, V // chunk, chunk)
    best = chunks.amax(-1).argmax(-1)
    return best * chunk + chunks[torch.arange(B), best].argmax(-1)


def screened_greedy(h: torch.Tensor, weight: torch.Tensor, screen: Screen,
                    logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`greedy(logits(h))` for hidden states h [B, dim] and the fp32 vocabulary projection
    `weight` [V, dim], with most of its products done on a cheaper copy (model.Screen).

    Every approximate logit lies within the screen's bound_b of the fp32 one, so a token whose
    approximate logit is more than 2 bound_b below the row's largest cannot be that row's
    argmax. Only the tokens that pass for some row are multiplied in fp32, in vocabulary order:
    the same first maximum, up to fp32 rounding between logits that tie to ~1e-7 (where
    transformers' own products already round differently). On the 15M config's random weights
    ~10 (one row) to ~100-1400 (16 rows) of 32k tokens pass. Falls back to the full logits
    where nothing passes (NaN) or too much does."""
    approx = screen.logits(h)
    # Each token's best over the rows, and each row's best (fp32 reduces and compares faster
    # than bf16; the values are exact).
    if len(h) == 1:
        best = approx[0].float()
        top = best.max()
    else:
        best, top = approx.amax(0).float(), approx.amax(-1).float()
    # One floor for all rows: a superset of each row's tokens, harmless.
    floor = float((top - 2 * screen.bound(h)).min())
    ids = (best >= floor).nonzero().view(-1)
    if not 0 < ids.numel() <= weight.shape[0] // 8:
        return greedy(logits(h))
    return ids[torch.mm(h, weight.index_select(0, ids).t()).argmax(-1)]


def truncate(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
             first: int = 64) -> torch.Tensor:
    """logits [B, V] with every token outside each row's top-k and top-p nucleus set to -inf:
    the smallest prefix of the tokens by probability whose mass reaches top_p (the first token
    always stays), cut to top_k tokens where top_k > 0 (top_p/top_k [B, 1]; rows with top_p 1
    and top_k 0 stay as they are). Only the `first` most probable tokens are ranked, four times
    more while some row's nucleus may reach past them: a full sort of a 32k vocabulary costs
    ~1 ms per row, and nuclei are usually far smaller."""
    V = logits.shape[-1]
    active = (top_k > 0) | (top_p < 1)
    probs = logits.softmax(-1)
    n = min(first, V)
    while True:
        top, order = probs.topk(n, -1)
        rank = torch.arange(n, device=logits.device).view(1, -1)
        drop = ((top_k > 0) & (rank >= top_k)) | ((top.cumsum(-1) - top) >= top_p)
        # `drop` grows with rank, so a row whose last ranked token is dropped is complete.
        if n == V or bool((drop[:, -1:] | ~active).all()):
            break
        n = min(4 * n, V)
    kept = logits.gather(-1, order).masked_fill(drop, float("-inf"))
    cut = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)
    return torch.where(active, cut, logits)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                top_k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]; temperature 0 means greedy for that row."""
    sampled_rows = temperature.view(-1) > 0
    if not bool(sampled_rows.any()):
        return greedy(logits)
    logits = logits.float() / temperature.clamp_min(1e-6)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        logits = truncate(logits, top_p, top_k)
    # Inverse-CDF sampling: exact, and much cheaper than torch.multinomial on a large
    # vocabulary (one cumsum and a binary search per row); right=True never lands on a
    # zero-probability token.
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).view(-1)
    if bool(sampled_rows.all()):
        return choice
    return torch.where(sampled_rows, choice, greedy(logits))


def generate(model: Transformer, prompts: list[list[int]], *args, **kwargs) -> Generation:
    """`sample` with autograd off and the decode-friendly weight copies (model.py); one prompt
    decodes one row per step, where oneDNN's packed copies would not pay for themselves."""
    with torch.inference_mode(), inference_copies(packed=len(prompts) > 1):
        return sample(model, prompts, *args, **kwargs)


def sample(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    eos_id: int | None = 2,
    pad_id: int = 0,
    seed: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    max_batch_tokens: int | None = None,
    logprobs: bool = True,
) -> Generation:
    """Sample up to `max_new_tokens` after each prompt (token ids, BOS included).

    temperature/top_p/top_k may be given per prompt. `stop(row, new_tokens)` ends a row early
    (stop strings); `on_token(row, token)` streams every new token as it is sampled.
    `max_batch_tokens` splits a large batch into chunks that fit that many cache slots.
    `logprobs=False` skips the log-softmax over the vocabulary that the log-probabilities cost
    every step (16 x 32k logits: ~0.3 ms), for callers that only want tokens.
    """
    if not prompts:
        return Generation([], [], [])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    ctx = model.args.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
                         f"the model's context of {ctx} tokens")
    n = len(prompts)
    temps, tps = _per_row(temperature, n, "temperature"), _per_row(top_p, n, "top_p")
    tks = _per_row(top_k, n, "top_k").long()
    generator = None
    device = model.output.weight.device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if max_batch_tokens and n > 1 and n * (longest + max_new_tokens) > max_batch_tokens:
        per = max(1, max_batch_tokens // (longest + max_new_tokens))
        out = Generation([], [], [])
        for s in range(0, n, per):
            def row_stop(r, t, s=s):
                return stop(r + s, t)

            def row_token(r, t, s=s):
                on_token(r + s, t)

            part = generate(model, prompts[s:s + per], max_new_tokens,
                            temps[s:s + per].view(-1).tolist(), tps[s:s + per].view(-1).tolist(),
                            tks[s:s + per].view(-1).tolist(), eos_id, pad_id,
                            None if seed is None else seed + s,
                            row_stop if stop else None, row_token if on_token else None,
                            logprobs=logprobs)
            out.tokens += part.tokens
            out.logprobs += part.logprobs
            out.finished += part.finished
        return out

    temps, tps, tks = temps.to(device), tps.to(device), tks.to(device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    pads = longest - lengths
    tokens = torch.full((n, longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    total = longest + max_new_tokens
    padded = bool((pads > 0).any())
    valid = torch.ones(n, total, dtype=torch.bool, device=device)
    if padded:
        valid[:, :longest] = torch.arange(longest, device=device).view(1, -1) >= pads.view(-1, 1)
    cache = model.new_cache(n, total)

    # Prefill: every prompt at once; rotary positions start at 0 after each row's padding.
    positions = (torch.arange(longest, device=device).view(1, -1) - pads.view(-1, 1)).clamp_min(0)
    mask = causal_padding_mask(valid[:, :longest]) if padded else None
    h = model.hidden(tokens, positions=positions if padded else None, mask=mask, cache=cache)

    # Greedy rows without log-probabilities need only each row's largest logit.
    screen = None
    if (not logprobs and type(model.output) is nn.Linear and not bool((temps > 0).any())
            and not torch.is_autocast_enabled(device.type)):
        screen = screen_weight(model.output)

    def pick(h: torch.Tensor, temps: torch.Tensor, tps: torch.Tensor, tks: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next token of each row from its last hidden state, and the logits if made."""
        if screen is not None:
            return screened_greedy(h, model.output.weight, screen, model.logits), None
        logits = model.logits(h)
        return sample_next(logits, temps, tps, tks, generator), logits

    rows = torch.arange(n, device=device)  # original index of each active row
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    out_logprobs: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    pos = lengths.clone()  # next rotary position of each active row
    for step in range(max_new_tokens):
        nxt, logits = pick(h[:, -1], temps, tps, tks)
        nxt_list, row_list = nxt.tolist(), rows.tolist()
        if logprobs:
            logp = torch.log_softmax(logits.float(), -1).gather(-1, nxt.view(-1, 1)).view(-1)
            for r, lp in zip(row_list, logp.tolist()):
                out_logprobs[r].append(lp)
        done = []
        for j, (r, t) in enumerate(zip(row_list, nxt_list)):
            out_tokens[r].append(t)
            if on_token is not None:
                on_token(r, t)
            if t == eos_id or (stop is not None and stop(r, out_tokens[r])):
                finished[r] = True
                done.append(j)
        if step == max_new_tokens - 1 or len(done) == len(row_list):
            break
        if done:  # drop finished rows from the batch and the cache
            keep = torch.ones(len(row_list), dtype=torch.bool, device=device)
            keep[done] = False
            cache.select(keep)
            rows, nxt, pos = rows[keep], nxt[keep], pos[keep]
            temps, tps, tks, valid = temps[keep], tps[keep], tks[keep], valid[keep]
        start = longest + step
        step_mask = valid[:, : start + 1].view(len(rows), 1, 1, start + 1) if padded else None
        h = model.hidden(nxt.view(-1, 1), positions=pos.view(-1, 1) if padded else None,
                         mask=step_mask, cache=cache, start=start)
        pos = pos + 1
    return Generation(out_tokens, out_logprobs, finished)


def fit_prompt(ids: list[int], room: int) -> list[int]:
    """Cut a prompt from the left to `room` tokens, keeping BOS (the latest turns matter)."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]


def reply(loaded, dialogs: list, max_new_tokens: int = 48,
          temperature: float | Sequence[float] = 0.0, seed: int | None = 0,
          prompt_format: str = "chat", max_batch_tokens: int = 32768,
          **kwargs) -> tuple[list[str], list[list[int]], Generation]:
    """The next assistant turn of each dialog: texts, prompt ids and the raw Generation.

    prompt_format "chat" is the Llama 2 chat format; "transcript" the plain User/Assistant
    transcript a pretrained model knows (its reply ends at the first newline). Prompts longer
    than the context keep their latest tokens."""
    from llama2.chat import encode_prompt, encode_transcript

    tok, ctx = loaded.tokenizer, loaded.args.max_seq_len
    budget = max(1, min(max_new_tokens, ctx // 2))
    encode = {"chat": encode_prompt, "transcript": encode_transcript}[prompt_format]
    ids = [fit_prompt(encode(tok, d), ctx - budget) for d in dialogs]
    gen = generate(loaded.model, ids, max_new_tokens=budget, temperature=temperature,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, seed=seed,
                   max_batch_tokens=max_batch_tokens, **kwargs)
    texts = [tok.decode(truncate_at_eos(t, tok.eos_id)) for t in gen.tokens]
    if prompt_format == "transcript":
        texts = [t.split("\n", 1)[0] for t in texts]
    return [t.strip() for t in texts], ids, gen


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def complete(model: Transformer, tokenizer, texts: list[str], **kwargs) -> list[str]:
    """Text in, text out: encode with BOS, generate, decode up to EOS."""
    prompts = tokenizer.encode_batch(texts, bos=True)
    kwargs.setdefault("logprobs", False)
    gen = generate(model, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **kwargs)
    return [tokenizer.decode(truncate_at_eos(t, tokenizer.eos_id)) for t in gen.tokens]


def log_likelihood(model: Transformer, sequences: list[list[int]], starts: list[int],
                   pad_id: int = 0, batch_size: int = 16) -> list[float]:
    """Sum of log p(token) over sequence[start:] for each sequence (scoring, e.g. TruthfulQA)."""
    out: list[float] = []
    device = model.output.weight.device
    with torch.inference_mode():
        for b in range(0, len(sequences), batch_size):
            seqs, sts = sequences[b:b + batch_size], starts[b:b + batch_size]
            T = max(len(s) for s in seqs)
            x = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
            for i, s in enumerate(seqs):
                x[i, : len(s)] = torch.tensor(s)
            logp = F.log_softmax(model(x[:, :-1]).float(), -1)
            tok_lp = logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            for i, (s, st) in enumerate(zip(seqs, sts)):
                out.append(float(tok_lp[i, max(st - 1, 0): len(s) - 1].sum()))
    return out
