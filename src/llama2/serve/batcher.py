"""Dynamic batching for the HTTP server: one worker thread, one `respond` call per batch.

Requests become `Job`s in a bounded queue. The worker takes every queued job it can fit (up to
`max_batch_size`, and only while the longest prompt plus the largest max_tokens fits the
context, because `generate` sizes its cache for both) and runs them through ONE `respond` call
(`llama2.respond`: one `generate` call) with per-row format, max_tokens, stop strings and
temperature/top_p/top_k. Each row ends on its own: EOS, its own max_tokens, a stop string, or
its client going away (the `stream` callback answers True), so a short request leaves the batch
early and costs nothing afterwards.

Text is decoded and stop strings are checked in the worker (by `respond`), so the event loop
only relays ready-made text deltas (pushed with `loop.call_soon_threadsafe` into each request's
asyncio queue). A delta never contains text that might turn out to be the start of a stop
string, nor half of a multi-byte character.

Seeds: `generate` has one random generator per call, so what a sampled row draws depends on
its batch mates. A request that sets `seed` (and samples, temperature > 0) therefore runs in a
batch of its own and gets exactly what `generate(model, [prompt], seed=seed, ...)` gives: the
same output for the same request whatever the load. Greedy requests (temperature 0) are
deterministic anyway and batch with anything; unseeded sampled requests batch freely too.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from llama2.generation import Decoder, generate
from llama2.model import Transformer
from llama2.respond import respond
from llama2.tokenizer import Tokenizer

log = logging.getLogger("llama2.serve")

# An event for a request's asyncio queue: ("delta", index, text) | ("done", index, reason,
# completion_tokens) | ("error", index, message).
Event = tuple[Any, ...]


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the caller answers 429 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s")
        self.retry_after = retry_after


class Sink:
    """A request's asyncio queue and the event loop it lives in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue


def _deliver(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def post(items: list[tuple[Sink, Event]]) -> None:
    """Hand events to their event loops from any thread: one wake-up per loop, not per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
    for sink, event in items:
        by_loop.setdefault(sink.loop, []).append((sink.queue, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass


@dataclass(eq=False)
class Job:
    """One completion (one choice of one request) waiting for, or inside, a batch."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    sink: Sink  # where this job's events go (its request's asyncio queue)
    index: int = 0  # the choice index inside its request
    format: str = "chat"  # "chat": the answer decoded alone; "text": a continuation of the prompt
    cancelled: bool = False  # set by the event loop when the client goes away

    @property
    def solo(self) -> bool:
        return self.seed is not None and self.temperature > 0


def _release_memory() -> None:
    """Give freed heap back to the OS after a batch, so RSS returns to its idle baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its pages, no harm
        pass


class Batcher:
    """The bounded queue and the worker thread that serves it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 16,
                 max_queue: int = 64, batch_wait: float = 0.02):
        self.model, self.tok = model, tokenizer
        self.ctx = model.args.max_seq_len
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max(0, max_queue)
        self.batch_wait = max(0.0, batch_wait)
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.running = 0
        self._batch: list[Job] = []  # the batch inside `generate` now
        self._outbox: list[tuple[Sink, Event]] = []  # this step's events, not yet delivered
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "rejected": 0,
                      "cancelled": 0}
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._closed = False
        self.decoder = Decoder(model)  # compiled on CUDA: held for the server's lifetime
        # Warm up once (lazy kernel and allocator setup), so the first request is not slow and
        # memory at rest already includes these one-time costs.
        generate(model, [[tokenizer.bos_id], [tokenizer.bos_id] * 2], max_new_tokens=2,
                 eos_id=None, pad_id=tokenizer.pad_id, decoder=self.decoder)
        _release_memory()
        self._thread = threading.Thread(target=self._loop, name="llama2-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none of them (QueueFull)."""
        with self.cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self.queue) + len(jobs) > self.max_queue:
                self.stats["rejected"] += 1
                waits = 1 + len(self.queue) // self.max_batch_size
                raise QueueFull(max(1, round(waits * self._batch_seconds)))
            self.queue.extend(jobs)
            self.stats["requests"] += 1
            self.cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: queued jobs are dropped, running rows end at the next step."""
        with self.cond:
            for job in jobs:
                job.cancelled = True
                try:
                    self.queue.remove(job)
                except ValueError:
                    pass

    def close(self) -> None:
        with self.cond:
            self._closed = True
            post([(j.sink, ("error", j.index, "the server is shutting down")) for j in self.queue])
            self.queue.clear()
            for job in self._batch:  # end the running rows at their next token
                job.cancelled = True
            self.cond.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker side
    def _take_batch(self) -> list[Job]:
        """FIFO: the head job, then followers while they fit in the same `generate` call."""
        first = self.queue.popleft()
        batch = [first]
        if first.solo:
            return batch
        longest, most = len(first.prompt), first.max_tokens
        while self.queue and len(batch) < self.max_batch_size:
            nxt = self.queue[0]
            # Stop at the first job that does not fit, rather than skipping it: no starvation.
            if nxt.solo or max(longest, len(nxt.prompt)) + max(most, nxt.max_tokens) > self.ctx:
                break
            batch.append(self.queue.popleft())
            longest, most = max(longest, len(nxt.prompt)), max(most, nxt.max_tokens)
        return batch

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self._closed:
                    self.cond.wait()
                # A burst of requests arrives over a few ms: give it a moment to fill the batch,
                # else the first request runs alone and the rest wait for all of it.
                deadline = time.monotonic() + self.batch_wait
                while (self.queue and len(self.queue) < self.max_batch_size
                       and not self.queue[0].solo and not self._closed):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                if self._closed:
                    return
                if not self.queue:  # all cancelled while we waited
                    continue
                batch = self._take_batch()
                self.running, self._batch = len(batch), batch
            t0 = time.perf_counter()
            try:
                self._run(batch)
            except Exception as e:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                self._outbox.clear()
                post([(j.sink, ("error", j.index, f"generation failed: {type(e).__name__}: {e}"))
                      for j in batch])
            finally:
                dt = time.perf_counter() - t0
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * dt
                with self.cond:
                    self.running, self._batch = 0, []
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                    idle = not self.queue
                del batch
                if idle:
                    _release_memory()

    def _run(self, batch: list[Job]) -> None:
        last_row = [-1]

        def stream(row: int, text: str) -> bool:
            if row <= last_row[0]:  # rows come in order: a lower one starts the next step
                self._post()
            last_row[0] = row
            job = batch[row]
            if job.cancelled:
                return True  # ends the row
            if text:
                self._send(job, ("delta", job.index, text))
            return False

        seed = batch[0].seed if batch[0].solo else None
        answers = respond(self.model, self.tok, [j.prompt for j in batch],
                          [j.max_tokens for j in batch], format=[j.format for j in batch],
                          temperature=[j.temperature for j in batch],
                          top_p=[j.top_p for j in batch], top_k=[j.top_k for j in batch],
                          seed=seed, stop=[j.stop for j in batch], fit="shrink", full=True,
                          stream=stream, decoder=self.decoder, max_batch_tokens=None)
        for job, answer in zip(batch, answers):
            if job.cancelled:
                if answer.reason == "cancelled":  # ended early because its client went away
                    self.stats["cancelled"] += 1
                continue
            self._send(job, ("done", job.index, answer.reason, len(answer.tokens)))
        self._post()

    def _send(self, job: Job, event: Event) -> None:
        self._outbox.append((job.sink, event))

    def _post(self) -> None:
        """Deliver a step's events together (one event-loop wake-up per step)."""
        if self._outbox:
            post(self._outbox)
            self._outbox = []
