"""The OpenAI-compatible server: a real uvicorn on a free port, the official `openai` client,
httpx for the raw protocol (errors, SSE, disconnects, bursts), and the `llama2 serve` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, shared_file
from llama2.chat import encode_prompt
from llama2.generation import generate

openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "stories260K"
STORY = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def loaded():
    import llama2

    return llama2.load(shared_file("tinyllamas-stories260K", "stories260K.bin"))


@pytest.fixture(scope="module")
def server(loaded):
    import torch

    from llama2.serve.server import running

    # As `llama2 serve` does for small models: one intra-op thread (on a shared 2-core box,
    # more threads spin against each other and against the event loop).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A small queue so that a burst of clients meets the 429 path.
    with running(loaded, model_name=NAME, api_key=KEY, max_batch_size=8, max_queue=8) as s:
        yield s
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as h:
        yield h


def reference(loaded, dialog, max_new_tokens: int) -> str:
    tok = loaded.tokenizer
    gen = generate(loaded.model, [encode_prompt(tok, dialog)], max_new_tokens=max_new_tokens,
                   eos_id=tok.eos_id, pad_id=tok.pad_id)
    return tok.decode(until_eos(gen.tokens[0], tok.eos_id))


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def test_greedy_chat_equals_generate_and_stream_matches(loaded, client):
    assert [m.id for m in client.models.list()] == [NAME]
    want = reference(loaded, STORY, 48)
    r = client.chat.completions.create(model=NAME, messages=STORY, temperature=0, max_tokens=48)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode_prompt(loaded.tokenizer, STORY))
    assert r.usage.completion_tokens == 48

    chunks = list(client.chat.completions.create(
        model=NAME, messages=STORY, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 48


def test_completions_and_stop_strings(loaded, client):
    r = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0,
                                  max_tokens=24)
    tok = loaded.tokenizer
    prompt = tok.encode("Once upon a time", bos=True)
    gen = generate(loaded.model, [prompt], max_new_tokens=24, eos_id=tok.eos_id, pad_id=tok.pad_id)
    # Prompt + completion reads as one text: the completion keeps its leading space.
    assert "Once upon a time" + r.choices[0].text == tok.decode(prompt + gen.tokens[0])
    assert r.usage.prompt_tokens == len(prompt) and r.choices[0].finish_reason == "length"

    full = reference(loaded, STORY, 48)
    word = full.split()[4]
    cut = client.chat.completions.create(model=NAME, messages=STORY, temperature=0, max_tokens=48,
                                         stop=[word, "zzzz"])
    assert cut.choices[0].message.content == full[: full.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    # Streamed, the stop string never leaks out, not even its first characters.
    stream = client.chat.completions.create(model=NAME, messages=STORY, temperature=0,
                                            max_tokens=48, stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full[: full.index(word)]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=NAME, messages=STORY, temperature=1.0, top_p=0.9, max_tokens=24, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_bad_requests_are_clear_4xx_and_the_server_stays_up(server, http):
    def error(response, status: int) -> str:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) >= {"message", "type", "code"}
        return body["message"]

    user = [{"role": "user", "content": "hi"}]
    url = "/v1/chat/completions"
    assert "not valid JSON" in error(http.post(url, content=b"{oops"), 400)
    assert "role 'robot'" in error(http.post(url, json={"messages": [
        {"role": "robot", "content": "hi"}]}), 400)
    assert "alternate" in error(http.post(url, json={"messages": user + user}), 400)
    assert "max_tokens" in error(http.post(url, json={"messages": user, "max_tokens": -1}), 400)
    assert "the context is 512" in error(http.post(url, json={"messages": [
        {"role": "user", "content": "cat " * 600}]}), 400)
    assert "more than the context of 512" in error(http.post(url, json={
        "messages": user, "max_tokens": 600}), 400)
    assert "does not exist" in error(http.post(url, json={"model": "gpt-4", "messages": user}), 404)
    assert "limit" in error(http.post(url, content=b"x" * 2_000_000), 413)
    assert "API key" in error(httpx.post(server.url + url, json={"messages": user}), 401)
    assert "incorrect API key" in error(httpx.get(server.url + "/v1/models", headers={
        "Authorization": "Bearer nope"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert health(server)["status"] == "ok"  # no key needed
    assert http.post(url, json={"messages": user, "max_tokens": 2}).status_code == 200


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_burst_of_64_clients_gets_200_or_429_and_memory_returns(server):
    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        body = {"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 24,
                "temperature": 0.8, "stream": i % 2 == 0}
        r = await c.post("/v1/chat/completions", json=body)
        if r.status_code == 200 and body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]")
        return r.status_code, r.headers.get("retry-after")

    async def burst() -> list[tuple[int, str | None]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    asyncio.run(burst())  # warm-up: allocator pools, thread pools, sockets
    before = rss_mb()
    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes  # queue 8 + batch 8 < 64
    assert all(ra and int(ra) >= 1 for c, ra in results if c == 429)
    stats = health(server)
    assert stats["largest_batch"] > 1  # concurrent requests shared generate calls
    assert stats["queued"] == 0 and stats["running"] == 0
    assert rss_mb() - before < 40, f"RSS grew from {before:.0f} MB to {rss_mb():.0f} MB"


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_disconnects_frees_its_row(server, http, stream):
    before = health(server)["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": stream}
    if stream:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: {")
    else:  # the client gives up waiting: the server notices within its poll interval
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.2))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = health(server)
        if h["running"] == 0 and h["cancelled"] > before:
            break
        time.sleep(0.05)
    assert h["running"] == 0 and h["cancelled"] == before + 1, h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_checkpoint_the_project_wrote(tmp_path):
    """`llama2 serve` on a fresh native checkpoint (random weights, trained tokenizer)."""
    import torch

    from llama2 import checkpoint
    from llama2.model import ModelArgs, Transformer
    from llama2.tokenizer import train_tokenizer

    texts = [f"the cat {i} sat on the mat and saw {i * 7} birds fly over the old red barn."
             for i in range(300)]
    tok = train_tokenizer(texts, tmp_path / "tok.model", vocab_size=300, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words,
                                  max_seq_len=128))
    checkpoint.save(model, tok, tmp_path / "ckpt")
    port = free_port()
    env = {**os.environ, "LLAMA2_API_KEY": KEY, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "llama2.cli", "serve", "--model",
                             str(tmp_path / "ckpt"), "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(url + "/health", timeout=2).json()["model"] == "ckpt"
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "cat?"}]
        r = c.chat.completions.create(model="ckpt", messages=dialog, temperature=0, max_tokens=12)
        gen = generate(model, [encode_prompt(tok, dialog)], max_new_tokens=12,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        assert r.choices[0].message.content == tok.decode(until_eos(gen.tokens[0], tok.eos_id))
        events = [json.loads(line[6:]) for line in httpx.post(
            url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"messages": dialog[1:], "max_tokens": 4, "stream": True},
            timeout=30).text.splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
