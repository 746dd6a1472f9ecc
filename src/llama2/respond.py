"""`respond`: dialogs or texts in, answers out. The one function that turns inputs into a
model's answers for every stage (preference sampling, rejection sampling, PPO rollouts, Ghost
Attention, safety answers, distillation, red teaming), every evaluation suite, the HTTP server,
the terminal chat and `llama2 generate`; all of them decode through `generation.generate`.

It owns what each of those once redid: encoding (the Llama 2 chat format, the plain
User/Assistant transcript a pretrained model knows, or text continued after BOS), fitting the
prompts and the token budget into the context, ending at EOS or a stop string, decoding the new
tokens (alone for an answer, after a few prompt tokens for a continuation, whose leading space
then survives), streaming the text as it grows, and the log-probabilities PPO needs.

Under torchrun it shares the work (the rule in engine/distributed.py): every rank calls it with
the same inputs, each generates every world_size-th of them, and the answers are gathered back
in input order on every rank. Each input samples from its own seeded stream (`seed` and its
index: `generation.row_seed`), so the answers are the one-process run's whatever the number of
ranks. An FSDP-sharded model is gathered whole once per call, so the ranks' decoding steps,
which differ, need no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llama2.chat import encode_prompt, encode_transcript, end_at_special_tag
from llama2.engine import distributed
from llama2.generation import Decoder, generate, row_seed
from llama2.model import Transformer

FORMATS = ("chat", "transcript", "text")
FITS = ("cut", "shrink", "skip")
TEXT_CONTEXT = 4  # prompt tokens a continuation is decoded after (keeps its leading space)


@dataclass
class Answer:
    """One answer: its text, the prompt ids it was generated from (after fitting), the new
    tokens as sampled (EOS or a stop string's last token included), their log-probabilities
    (temperature 1, before top-k/top-p; empty unless asked for) and why it ended: "stop" (EOS
    or a stop string), "length" (the token budget), "cancelled" (`stream` ended it) or
    "skipped" (fit="skip": no room in the context, nothing generated)."""

    text: str
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    reason: str

    @property
    def finished(self) -> bool:
        return self.reason == "stop"


class PromptTooLong(ValueError):
    """fit="shrink": a prompt leaves no room for a single new token in the context."""

    def __init__(self, tokens: int, context: int):
        self.tokens, self.context = tokens, context
        super().__init__(f"a prompt of {tokens} tokens leaves no room for an answer in the "
                         f"model's context of {context} tokens")


def encode(tok, item: Any, format: str = "chat") -> list[int]:
    """Prompt ids of a dialog ("chat": the Llama 2 chat format; "transcript": User/Assistant
    lines) or a text ("text": BOS + text); a list of token ids is taken as already encoded."""
    if isinstance(item, list) and (not item or isinstance(item[0], int)):
        return list(item)
    if format == "text":
        return tok.encode(item, bos=True)
    return (encode_prompt if format == "chat" else encode_transcript)(tok, item)


def fit_prompt(ids: list[int], room: int) -> list[int]:
    """Cut a prompt from the left to `room` tokens, keeping BOS (the latest turns matter)."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]


def _rows(value: Any, n: int, name: str) -> list:
    """One value per input: a list or tuple as given, anything else repeated."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} inputs")
    return values


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (or a character)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    if text.endswith("\ufffd"):  # a byte-fallback piece of an unfinished UTF-8 character
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class _Row:
    """A row's text while it streams: decoded whole each token (SentencePiece joins pieces in
    context), cut before a stop string, and the part already handed to `stream`."""

    def __init__(self, tok, context: list[int], stops: Sequence[str]):
        self.tok, self.context, self.stops = tok, context, stops
        self.head = tok.decode(context) if context else ""
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.reason: str | None = None

    def decode(self) -> str:
        if self.context:
            return self.tok.decode(self.context + self.tokens)[len(self.head):]
        return self.tok.decode(self.tokens)

    def add(self, token: int, eos: int | None, budget: int) -> bool:
        """Take a new token; True once the row has ended (EOS, a stop string or its budget)."""
        self.tokens.append(token)
        if token == eos:
            self.reason = "stop"
            return True
        text = self.decode()
        if self.stops:
            # Only the new tail can hold a new match: start the search just before it.
            start = max(0, len(self.text) - max(len(s) for s in self.stops))
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.reason = text[:min(hits)], "stop"
                return True
        self.text = text
        if len(self.tokens) >= budget:
            self.reason = "length"
            return True
        return False

    def delta(self) -> str:
        """The text not yet streamed that can no longer turn into a stop string (all of it
        once the row has ended)."""
        end = len(self.text)
        if self.reason is None:
            end -= _held_back(self.text, self.stops)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


def respond(
    model: Transformer,
    tokenizer,
    inputs: Sequence[Any],
    max_new_tokens: int | Sequence[int] = 48,
    *,
    format: str | Sequence[str] = "chat",
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    seed: int | Sequence[int] | None = 0,
    stop: Sequence[str] | Sequence[Sequence[str]] = (),
    end_at_tag: bool = True,
    fit: str = "cut",
    logprobs: bool = False,
    full: bool = False,
    stream: Callable[[int, str], bool | None] | None = None,
    decoder: Decoder | None = None,
    max_batch_tokens: int | None = 32768,
) -> list[str] | list[Answer]:
    """The answer to each input, in one batched, KV-cached `generate` call.

    inputs: dialogs ending with a user turn (format "chat" or "transcript"), texts to continue
    (format "text"), or their prompt ids already encoded (`encode`). `format`, the sampling
    settings, `max_new_tokens` and `stop` may be given per input.

    fit: what a prompt too long for the context gets. "cut": the budget is at most half the
    context and a longer prompt keeps BOS and its latest tokens. "shrink": prompts stay whole
    and the budget shrinks to the room the longest leaves (`PromptTooLong` where none is
    left). "skip": a prompt that does not fit whole with `max_new_tokens` gets an empty answer
    (reason "skipped"); the others as "cut".

    An answer ends at EOS or at the first of its `stop` strings (the row stops there, the text
    is cut before it). A chat answer is decoded alone and a continuation after its prompt's
    last tokens. Then a dialog format's answer ("chat", "transcript") is finished: the
    transcript's ends at its first newline, with `end_at_tag` at its first chat tag (the
    model starting a new turn; generation goes on unless the tags are `stop` strings), and it
    is stripped.

    stream(row, text): called for each new token of each row, in row order, with the text
    that has become safe to show (often ""; the raw text, before the finishing above, never
    the start of a possible stop string, all that is left once the row ends); a True return
    ends that row (reason "cancelled"); under torchrun each rank streams the rows it
    generates. seed: input i samples from its own stream, seeded `row_seed(seed, i)` (a list:
    one seed per input; None: unseeded), so an input's answer does not depend on the others.
    decoder: the caller's held `Decoder` of this model. max_batch_tokens: see `generate`.

    Returns the texts, or with `full` (or `logprobs`) the `Answer`s.
    """
    n = len(inputs)
    if n == 0:
        return []
    if distributed.is_sharded(model):  # every rank is here: gather the weights once
        model, decoder = distributed.gathered(model), None
    tok, ctx = tokenizer, model.args.max_seq_len
    formats = _rows(format, n, "format")
    if any(f not in FORMATS for f in formats):
        raise ValueError(f"format: expected one of {FORMATS}, got {sorted(set(formats))}")
    if fit not in FITS:
        raise ValueError(f"fit: expected one of {FITS}, got {fit!r}")
    wants = [int(w) for w in _rows(max_new_tokens, n, "max_new_tokens")]
    temps, tps = _rows(temperature, n, "temperature"), _rows(top_p, n, "top_p")
    tks = _rows(top_k, n, "top_k")
    seeds = None if seed is None else [row_seed(seed, i) for i in range(n)] \
        if isinstance(seed, int) else [int(x) for x in _rows(seed, n, "seed")]
    stop = [stop] if isinstance(stop, str) else list(stop)  # one list for all, or one per input
    stops = ([stop] * n if not stop or isinstance(stop[0], str)
             else [list(s) for s in _rows(stop, n, "stop")])
    ids = [encode(tok, x, f) for x, f in zip(inputs, formats)]
    full = full or logprobs

    rows = list(range(n))  # the inputs that are generated
    if fit == "skip":
        rows = [i for i in rows if len(ids[i]) + wants[i] <= ctx]
    if fit == "shrink":
        longest = max(len(p) for p in ids)
        if longest >= ctx:
            raise PromptTooLong(longest, ctx)
        budgets = [min(w, ctx - longest) for w in wants]
    else:
        budgets = [max(1, min(w, ctx // 2)) for w in wants]
        room = ctx - max((budgets[i] for i in rows), default=0)
        for i in rows:
            ids[i] = fit_prompt(ids[i], room)

    answers = [Answer("", ids[i], [], [], "skipped") for i in range(n)]
    info = distributed.current()
    mine = rows[info.rank::info.world_size]  # this rank's share (all of them alone)
    if mine:
        _run(model, tok, ids, mine, budgets, formats, stops, temps, tps, tks, seeds, logprobs,
             stream, decoder, max_batch_tokens, answers)
    if info.distributed:
        got = distributed.gather_shares(
            [(i, (a.tokens, a.logprobs, a.text, a.reason)) for i in mine for a in [answers[i]]],
            n, info)
        for i in rows:
            a = answers[i]
            a.tokens, a.logprobs, a.text, a.reason = got[i]
    for i in rows:
        a = answers[i]
        if formats[i] == "transcript":
            a.text = a.text.split("\n", 1)[0]
        if formats[i] != "text":
            a.text = (end_at_special_tag(a.text) if end_at_tag else a.text).strip()
    return answers if full else [a.text for a in answers]


def _run(model, tok, ids, rows, budgets, formats, stops, temps, tps, tks, seeds, logprobs,
         stream, decoder, max_batch_tokens, answers) -> None:
    """One `generate` call for the inputs `rows`; fills their answers' tokens and raw text."""
    eos = tok.eos_id
    contexts = [ids[i][1:][-TEXT_CONTEXT:] if formats[i] == "text" else [] for i in rows]
    most = max(budgets[i] for i in rows)
    on_token = stop_row = None
    state: list[_Row] = []
    if stream is not None or any(stops[i] for i in rows):  # follow the text token by token
        state = [_Row(tok, c, stops[i]) for c, i in zip(contexts, rows)]

        def on_token(r: int, token: int) -> None:
            row = state[r]
            if row.reason is not None:
                return
            ended = row.add(token, eos, budgets[rows[r]])
            if stream is not None and stream(rows[r], row.delta()) and not ended:
                row.reason = "cancelled"

        def stop_row(r: int, tokens: list[int]) -> bool:
            return state[r].reason is not None
    elif any(budgets[i] < most for i in rows):  # per-row budgets only
        def stop_row(r: int, tokens: list[int]) -> bool:
            return len(tokens) >= budgets[rows[r]]

    gen = generate(model, [ids[i] for i in rows], max_new_tokens=most,
                   temperature=[temps[i] for i in rows], top_p=[tps[i] for i in rows],
                   top_k=[tks[i] for i in rows], eos_id=eos, pad_id=tok.pad_id,
                   seed=None if seeds is None else [seeds[i] for i in rows],
                   stop=stop_row, on_token=on_token, max_batch_tokens=max_batch_tokens,
                   logprobs=logprobs, decoder=decoder)
    for r, i in enumerate(rows):
        tokens = gen.tokens[r]
        a = answers[i]
        a.tokens, a.logprobs = tokens, gen.logprobs[r]
        if state:
            a.text, a.reason = state[r].text, state[r].reason or "length"
            continue
        new = tokens[: tokens.index(eos)] if eos in tokens else tokens
        if contexts[r]:
            c = contexts[r]
            a.text = tok.decode(c + new)[len(tok.decode(c)):]
        else:
            a.text = tok.decode(new)
        a.reason = "stop" if eos in tokens else "length"
