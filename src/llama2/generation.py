"""Decoding: the one generator that chat, serving, rejection sampling, PPO rollouts, Ghost
Attention, distillation and evaluation all use, through `llama2.respond.respond` (dialogs or
texts in, answers out).

A static KV cache (`KVCache`, [B, n_kv_heads, S, head_dim] per layer, S = the longest prompt +
the new tokens), a prefill of every prompt at once, then one decode step per token that runs
eager or compiled with `torch.compile` (`Decoder`; gpt-fast's recipe: fixed shapes, the step
compiled apart from prefill, CUDA graphs through mode="reduce-overhead"). Prompts of different
lengths are left-padded; each row keeps its own rotary positions and a padding mask, so a row's
tokens are what it would get alone. Eager decoding drops finished rows from the batch (the
remaining steps cost less); a compiled step keeps its shapes and masks them instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama2.model import Transformer, causal_padding_mask
from llama2.packed import packed_twin


@dataclass
class Generation:
    """New tokens per prompt, their log-probabilities under the model (temperature 1, before
    top-k/top-p: the policy's own probability, what PPO and rejection sampling need; empty lists
    when not asked for), and whether each row stopped on EOS or a stop rule (True) or ran out
    of tokens (False)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


class KVCache:
    """Keys and values of every layer, [B, n_kv_heads, max_len, head_dim], of fixed shape: a
    step writes its positions in place and attends over the whole cache through its mask, or,
    eager, over its first `length` positions (those written so far: less work, same result)."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int):
        args, w = model.args, model.tok_embeddings.weight
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        # Zeros, not empty: masked positions still enter attention's product (0 * NaN = NaN).
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.length: int | None = None

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, T, D] at positions input_pos [T]; return the whole cache."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, input_pos, k if k.dtype == k_all.dtype else k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v if v.dtype == v_all.dtype else v.to(v_all.dtype))
        if self.length is not None:
            return k_all[:, :, :self.length], v_all[:, :, :self.length]
        return k_all, v_all

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (eager decoding drops finished sequences)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def _decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor,
                 input_pos: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Logits [B, V] of one new token per row: tokens/positions [B, 1] at cache position
    input_pos [1], attending to the cache positions that mask [B, 1, 1, S] marks."""
    h = model.hidden(tokens, positions=positions, mask=mask, cache=cache, input_pos=input_pos)
    return model.output(h[:, -1])


_COMPILED: dict[str, Callable] = {}  # one compiled step per mode: its cost is paid once a process


class Decoder:
    """Runs one model's prefill and decode steps, eager or compiled, for as long as its weights
    do not change: hold one where a model with fixed weights decodes many times (the server,
    chat, an evaluation); `generate` makes a passing one otherwise (after an optimizer step, make
    a new one). It keeps its static KV cache between calls (a compiled step is only fast on the
    same cache).

    compile: None chooses per device: compiled on CUDA, where a step is dominated by launching
    kernels (CUDA graphs remove that), eager on CPU, where compiling costs more than the
    pipeline's many short generate calls with ever new shapes save.
    packed: eager CPU decoding runs a twin of the model with fused projections and
    oneDNN-packed large linears (`llama2.packed`; None where it steps aside or under
    autocast)."""

    def __init__(self, model: Transformer, compile: bool | None = None, packed: bool = True):
        self.model = model
        device = model.output.weight.device
        self.compiled = device.type == "cuda" if compile is None else compile
        self.step = _decode_step
        if self.compiled:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            if mode not in _COMPILED:
                _COMPILED[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True)
            self.step = _COMPILED[mode]
        self.twin = packed_twin(model) if packed and not self.compiled else None
        self._cache: KVCache | None = None

    def net(self) -> Transformer:
        """The model this call decodes with: the twin where there is one and autocast (whose
        activations its packed weights would refuse) is off."""
        if self.twin is None or torch.is_autocast_enabled("cpu"):
            return self.model
        return self.twin

    def cache(self, batch_size: int, max_len: int) -> KVCache:
        """A zeroed-or-reused cache of this shape: stale entries sit only at masked positions."""
        c = self._cache
        if c is None or c.k[0].shape[0] != batch_size or c.max_len != max_len:
            c = KVCache(self.model, batch_size, max_len)
            if self.compiled:  # kept by the compiled graph (CUDA graphs) rather than copied in
                for buf in c.k + c.v:
                    torch._dynamo.mark_static_address(buf)
            self._cache = c if self.compiled else None
        return c


def _per_row(value: float | Sequence[float], n: int, name: str) -> torch.Tensor:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} prompts")
    return torch.tensor(values).view(n, 1)


_MASK64 = (1 << 64) - 1


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s random stream in a call seeded with `seed` (splitmix64 of the
    pair): each prompt draws from its own stream, so its samples depend on the call's seed and
    its index alone, not on which other prompts share the batch, the chunk or the process."""
    z = (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits


class RowDraws:
    """The uniform draws of sampled rows, one seeded CPU stream per row: step t of row r is
    the t-th draw of r's stream, whatever the batch (drawn 64 steps at a time)."""

    BLOCK = 64

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device, self.blocks = device, []

    def __call__(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """Uniforms [len(rows), 1] of step `step` for the original rows `rows`."""
        b = step // self.BLOCK
        while len(self.blocks) <= b:
            self.blocks.append(torch.stack([torch.rand(self.BLOCK, generator=g)
                                            for g in self.gens]).to(self.device))
        return self.blocks[b][rows, step % self.BLOCK].view(-1, 1)


def greedy(logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """argmax over the last dimension of logits [B, V], the first maximum on ties as
    `torch.argmax`: on CPU argmax scans a row one element at a time, so find the chunk that holds
    the first maximum with a vectorized `amax` and scan only that chunk."""
    B, V = logits.shape
    if V % chunk or V < 64 * chunk or logits.device.type != "cpu":
        return logits.argmax(-1)
    chunks = logits.view(B, V // chunk, chunk)
    best = chunks.amax(-1).argmax(-1)
    return best * chunk + chunks[torch.arange(B), best].argmax(-1)


def truncate(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
             first: int = 64) -> torch.Tensor:
    """logits [B, V] with every token outside each row's top-k and top-p nucleus set to -inf:
    the smallest prefix of the tokens by probability whose mass reaches top_p (the first token
    always stays), cut to top_k tokens where top_k > 0 (top_p/top_k [B, 1]; rows with top_p 1
    and top_k 0 stay as they are). Only the `first` most probable tokens are ranked, four times
    more while some row's nucleus may reach past them: a full sort of the vocabulary per row
    is costly, and nuclei are usually far smaller."""
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
                top_k: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row from logits [B, V]; temperature 0 means greedy for that row.
    uniforms [B, 1]: the rows' random draws in [0, 1) (None only when no row samples)."""
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
    u = uniforms * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).view(-1)
    if bool(sampled_rows.all()):
        return choice
    return torch.where(sampled_rows, choice, greedy(logits))


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    eos_id: int | None = 2,
    pad_id: int = 0,
    seed: int | Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    max_batch_tokens: int | None = None,
    logprobs: bool = True,
    decoder: Decoder | None = None,
) -> Generation:
    """Sample up to `max_new_tokens` after each prompt (token ids, BOS included), autograd off.

    temperature/top_p/top_k may be given per prompt. `stop(row, new_tokens)` ends a row early
    (stop strings); `on_token(row, token)` streams every new token as it is sampled.
    `max_batch_tokens` splits a large batch into chunks that fit that many cache slots.
    seed: each prompt samples from its own random stream, seeded `row_seed(seed, i)` for
    prompt i (a list: the rows' own seeds), so a prompt's samples do not depend on the other
    prompts of the call or on the chunks; None: torch's global generator.
    `logprobs=False` skips the log-softmax over the vocabulary, for callers that only want
    tokens. `decoder`: the caller's `Decoder` of this model (eager or compiled, its cache kept).
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
    decoder = decoder if decoder is not None else Decoder(model)
    if isinstance(seed, int):
        seed = [row_seed(seed, r) for r in range(n)]
    elif seed is not None:
        seed = [int(s) for s in seed]
        if len(seed) != n:
            raise ValueError(f"seed: got {len(seed)} values for {n} prompts")

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
                            None if seed is None else seed[s:s + per],
                            row_stop if stop else None, row_token if on_token else None,
                            logprobs=logprobs, decoder=decoder)
            out.tokens += part.tokens
            out.logprobs += part.logprobs
            out.finished += part.finished
        return out
    with torch.inference_mode():
        return _decode(decoder, prompts, max_new_tokens, temps, tps, tks, eos_id, pad_id, seed,
                       stop, on_token, logprobs)


def _decode(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int,
            temps: torch.Tensor, tps: torch.Tensor, tks: torch.Tensor, eos_id: int | None,
            pad_id: int, seed: list[int] | None,
            stop: Callable[[int, list[int]], bool] | None,
            on_token: Callable[[int, int], None] | None, logprobs: bool) -> Generation:
    """Prefill, then one decode step per token (see `generate`)."""
    model, n = decoder.net(), len(prompts)
    device = decoder.model.output.weight.device
    temps, tps, tks = temps.to(device), tps.to(device), tks.to(device)
    longest = max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    pads = longest - lengths
    tokens = torch.full((n, longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    total = longest + max_new_tokens
    valid = torch.ones(n, total, dtype=torch.bool, device=device)  # False on left padding
    valid[:, :longest] = torch.arange(longest, device=device).view(1, -1) >= pads.view(-1, 1)
    cache = decoder.cache(n, total)

    # Prefill: every prompt at once; rotary positions start at 0 after each row's padding.
    positions = (torch.arange(longest, device=device).view(1, -1) - pads.view(-1, 1)).clamp_min(0)
    cache.length = None if decoder.compiled else longest
    prefill_mask = causal_padding_mask(valid[:, :cache.length or total], longest)
    h = model.hidden(tokens, positions=positions, mask=prefill_mask, cache=cache,
                     input_pos=torch.arange(longest, device=device))
    logits = model.output(h[:, -1])
    # A step attends to the cache's real positions (no left padding) up to its own, through an
    # additive mask (0 or -inf) made once here: a boolean one is converted in every layer.
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else logits.dtype
    bias = torch.zeros(n, 1, 1, total, dtype=dtype, device=device).masked_fill_(
        ~valid.view(n, 1, 1, total), float("-inf"))
    causal = (torch.full((total, total), float("-inf"), dtype=dtype, device=device).triu(1)
              if decoder.compiled else None)  # eager attends over the written positions only

    sampled = bool((temps > 0).any())
    draws = RowDraws(seed, device) if sampled and seed is not None else None
    rows = torch.arange(n, device=device)  # original index of each row in the batch
    active = list(range(n))  # positions in the batch of the rows still decoding
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    out_logprobs: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    pos = lengths.view(-1, 1).clone()  # next rotary position of each row
    for step in range(max_new_tokens):
        # Each row draws from its own stream (unseeded: every row draws from the global one
        # each step, finished or not), so a row's samples do not depend on which others are
        # still in the batch (eager drops them, compiled keeps them).
        uniforms = None
        if draws is not None:
            uniforms = draws(step, rows)
        elif sampled:
            uniforms = torch.rand(n, 1, device=device)[rows]
        nxt = sample_next(logits, temps, tps, tks, uniforms)
        nxt_list, row_list = nxt.tolist(), rows.tolist()
        if logprobs:
            logp = torch.log_softmax(logits.float(), -1).gather(-1, nxt.view(-1, 1)).view(-1)
            logp_list = logp.tolist()
        done = []
        for j in active:
            r, t = row_list[j], nxt_list[j]
            out_tokens[r].append(t)
            if logprobs:
                out_logprobs[r].append(logp_list[j])
            if on_token is not None:
                on_token(r, t)
            if t == eos_id or (stop is not None and stop(r, out_tokens[r])):
                finished[r] = True
                done.append(j)
        if step == max_new_tokens - 1 or len(done) == len(active):
            break
        if done and not decoder.compiled:  # drop finished rows from the batch and the cache
            keep = torch.ones(len(row_list), dtype=torch.bool, device=device)
            keep[done] = False
            cache.select(keep)
            rows, nxt, pos = rows[keep], nxt[keep], pos[keep]
            temps, tps, tks, bias = temps[keep], tps[keep], tks[keep], bias[keep]
            active = list(range(len(rows)))
        elif done:  # a compiled step keeps its shapes: finished rows stay, unread
            active = [j for j in active if j not in done]
        t = longest + step
        if decoder.compiled:
            mask = bias + causal[t]
        else:
            cache.length, mask = t + 1, bias[..., :t + 1]
        logits = decoder.step(model, cache, nxt.view(-1, 1), torch.tensor([t], device=device),
                              pos, mask)
        pos = pos + 1
    return Generation(out_tokens, out_logprobs, finished)


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
