"""Pretraining data: corpus readers, shard preparation, window sampling, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.data.pretrain import iter_corpus, iter_text_file, main, prepare, prepare_files
from llama2.data.shards import TokenShards, WindowSampler, eval_sampler, read_index
from llama2.tokenizer import Tokenizer, train_tokenizer

STORIES = Path("/work/shared/data/tinystories-sample/tiny_stories.txt")


def _docs(n: int = 200) -> list[str]:
    words = ["the cat", "a dog", "ran home", "saw the sun", "was happy", "Lily", "Tom", "12"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(_docs(400), path, vocab_size=320)


def test_text_and_jsonl_readers(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n\nfour", encoding="utf-8")
    assert list(iter_text_file(tmp_path / "a.txt")) == ["one\ntwo", "three", "four"]
    lines = [json.dumps({"text": t}) for t in ("x y", "z")]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines[0] + "\n")
    docs = list(iter_corpus([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz")]))
    assert docs == ["one\ntwo", "three", "four", "x y", "z", "x y"]


def test_prepare_in_memory_documents(tmp_path: Path, tok: Tokenizer) -> None:
    docs = _docs(200)
    index = prepare(iter(docs), tok, tmp_path / "ds", val_fraction=0.1, workers=2,
                    shard_tokens=500, progress=False)
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.n_words
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["documents"] + val["documents"] == 200 and val["documents"] == 20
    assert len(train["files"]) > 1 and all(f["tokens"] <= 500 for f in train["files"])
    assert 0 < index["unigram_entropy"] < np.log(tok.n_words)
    # Concatenated shards are BOS doc EOS BOS doc EOS ..., in document order.
    flat = np.concatenate(TokenShards.open(tmp_path / "ds", "train").arrays).tolist()
    expected = [t for i, d in enumerate(docs) if i % 10 for t in tok.encode(d, True, True)]
    assert flat == expected
    assert not list((tmp_path / "ds").glob(".*"))  # no temporary files left


def test_window_sampler_is_deterministic_resumable_and_rank_split(tmp_path: Path,
                                                                  tok: Tokenizer) -> None:
    prepare(_docs(300), tok, tmp_path / "ds", val_fraction=0.05, progress=False, workers=1)
    shards = TokenShards.open(tmp_path / "ds")
    one = WindowSampler(shards, 16, seed=3, micro_batch_size=4, rank=0, world_size=1)
    b = one.next_batch()
    assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == torch.int64
    assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])
    rest = [one.next_batch() for _ in range(3)]
    # Two processes with micro-batch 2 see, together, the same samples in the same rounds.
    ranks = [WindowSampler(shards, 16, seed=3, micro_batch_size=2, rank=r, world_size=2)
             for r in (0, 1)]
    for expected in (b, rest[0]):
        got = torch.cat([r.next_batch()["tokens"] for r in ranks])
        assert torch.equal(got, expected["tokens"])
    # Resume: restoring the state continues exactly.
    again = WindowSampler(shards, 16, seed=3, micro_batch_size=4)
    again.load_state_dict({"samples": 4, "seed": 3, "seq_len": 16})
    assert all(torch.equal(again.next_batch()["tokens"], r["tokens"]) for r in rest)
    other = WindowSampler(shards, 16, seed=4, micro_batch_size=4)
    assert not torch.equal(other.next_batch()["tokens"], b["tokens"])


def test_eval_windows_cover_val_split(tmp_path: Path, tok: Tokenizer) -> None:
    prepare(_docs(300), tok, tmp_path / "ds", val_fraction=0.2, progress=False, workers=1)
    val = TokenShards.open(tmp_path / "ds", "val")
    sampler = eval_sampler(val, 16, micro_batch_size=4)
    batches = list(sampler.eval_batches())
    assert sum(len(b["tokens"]) for b in batches) >= len(sampler)
    assert len(batches) == len(list(sampler.eval_batches())) and len(sampler) > 4
    assert len(list(sampler.eval_batches(limit=2))) == 2


def test_uint32_for_large_vocab() -> None:
    from llama2.data.shards import token_dtype

    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.uint32


def test_bad_inputs_are_one_line_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt: corpus file not found"):
        prepare_files([str(tmp_path / "missing.txt")], tok, tmp_path / "o1")
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus.*empty.txt"):
        prepare_files([str(tmp_path / "empty.txt")], tok, tmp_path / "o2", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        prepare_files([str(tmp_path / "latin1.txt")], tok, tmp_path / "o3", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object"):
        prepare_files([str(tmp_path / "bad.jsonl")], tok, tmp_path / "o4", progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        read_index(tmp_path / "o2")
    for out in ("o2", "o3", "o4"):  # nothing half-written left behind
        assert not (tmp_path / out / "index.json").exists()
        assert not list((tmp_path / out).glob("*.bin")) and not list((tmp_path / out).glob(".*"))


def test_interrupted_prepare_leaves_no_dataset(tmp_path: Path, tok: Tokenizer) -> None:
    def docs():
        yield from _docs(50)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(docs(), tok, tmp_path / "ds", progress=False, workers=1)
    assert list((tmp_path / "ds").iterdir()) == []


def test_cli_prepare_and_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llama2.cli import main as cli

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(_docs(120)), encoding="utf-8")
    cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "320",
         "--out", str(tmp_path / "t.model")])
    main(["--input", str(corpus), "--tokenizer", str(tmp_path / "t.model"),
          "--out", str(tmp_path / "ds"), "--val-fraction", "0.1"])
    out = capsys.readouterr().out
    assert "train" in out and "unigram entropy" in out
    assert read_index(tmp_path / "ds")["splits"]["val"]["documents"] == 12
    with pytest.raises(SystemExit, match="llama2 prepare: error: .*nope.txt: corpus file not"):
        cli(["prepare", "--input", str(tmp_path / "nope.txt"), "--tokenizer",
             str(tmp_path / "t.model"), "--out", str(tmp_path / "x")])


@pytest.mark.skipif(not STORIES.is_file(), reason="TinyStories sample not present")
def test_tinystories_documents() -> None:
    docs = list(iter_text_file(STORIES))
    assert len(docs) > 1000 and docs[0].startswith("One day, a little girl named Lily")
