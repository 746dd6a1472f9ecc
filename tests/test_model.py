"""Model, checkpoint formats and generation, checked against transformers itself."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import shared_file
from llama2 import checkpoint
from llama2.generation import generate, log_likelihood
from llama2.model import Attention, ModelArgs, Transformer, preset

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")


def tiny(n_kv_heads: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=300,
                     multiple_of=16, max_seq_len=96, **kw)
    m = Transformer(args)
    m.init_weights(std=0.1)
    return m.eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_logits_equal_transformers_and_roundtrip(tmp_path, n_kv_heads):
    model = tiny(n_kv_heads, rope_theta=500.0)
    checkpoint.export_hf(model, None, tmp_path / "hf")
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        ours, theirs = model(x), peer(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        loaded = checkpoint.load(tmp_path / "hf")
        assert loaded.format == "hf"
        assert torch.equal(loaded.model(x), ours)
        # HF -> native -> HF again gives the same logits.
        checkpoint.save(loaded.model, None, tmp_path / "native")
        again = checkpoint.load(tmp_path / "native")
        assert again.format == "native" and torch.equal(again.model(x), ours)


def test_sharded_hf_folder_loads(tmp_path):
    model = tiny(2)
    peer_dir = tmp_path / "hf"
    checkpoint.export_hf(model, None, tmp_path / "one")
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "one")
    peer.save_pretrained(peer_dir, max_shard_size="50KB")
    assert len(list(peer_dir.glob("*.safetensors"))) > 1
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (checkpoint.load(peer_dir).model(x) - model(x)).abs().max() < 1e-5


def test_greedy_generation_equals_transformers_batched():
    model = tiny(2)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(model, None, d)
        peer = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    ours = generate(model, prompts, max_new_tokens=32, eos_id=None)
    for p, new in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = peer.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == new
    # The batch (left-padded, rows at different positions) equals each prompt alone.
    for p, new in zip(prompts, ours.tokens):
        assert generate(model, [p], max_new_tokens=32, eos_id=None).tokens[0] == new


def test_generation_logprobs_match_forward_and_sampling_is_seeded():
    model = tiny(2)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    g = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3,
                 eos_id=None)
    assert g.tokens == generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                                seed=3, eos_id=None).tokens
    assert g.tokens != generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                                seed=4, eos_id=None).tokens
    for p, new, lps in zip(prompts, g.tokens, g.logprobs):
        total = log_likelihood(model, [p + new], [len(p)])[0]
        assert abs(total - sum(lps)) < 1e-3
    # Without log-probabilities: the same tokens, none of the log-softmax work.
    bare = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3,
                    eos_id=None, logprobs=False)
    assert bare.tokens == g.tokens and bare.logprobs == [[], []]


def test_each_prompt_samples_from_its_own_seeded_stream():
    """A prompt's samples depend on the call's seed and its index only: not on the prompts
    beside it, the chunks of `max_batch_tokens` or the process that generates it."""
    from llama2.generation import row_seed

    model = tiny(2)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11], [1, 12, 13]]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, eos_id=None)
    whole = generate(model, prompts, seed=3, **kw).tokens
    assert generate(model, prompts, seed=3, max_batch_tokens=30, **kw).tokens == whole
    assert generate(model, prompts[2:], seed=[row_seed(3, 2), row_seed(3, 3)], **kw).tokens \
        == whole[2:]
    assert len({tuple(t) for t in whole}) == 4 and row_seed(3, 0) != row_seed(4, 0)


def test_generation_stops_on_eos_and_top_k_one_is_greedy():
    model = tiny(4)
    prompts = [[1, 5, 6], [1, 9]]
    greedy = generate(model, prompts, max_new_tokens=12, eos_id=None)
    k1 = generate(model, prompts, max_new_tokens=12, temperature=1.5, top_k=1, seed=0,
                  eos_id=None)
    assert k1.tokens == greedy.tokens
    eos = greedy.tokens[0][4]
    stopped = generate(model, prompts[:1], max_new_tokens=12, eos_id=eos)
    assert stopped.tokens[0] == greedy.tokens[0][: greedy.tokens[0].index(eos) + 1]
    assert stopped.finished == [True]


def test_prompt_longer_than_context_is_a_clear_error():
    model = tiny(2)
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        generate(model, [[1] * 90], max_new_tokens=10)


def _write_meta(model: Transformer, folder, n_shards: int) -> None:
    """Split a state dict the way Meta's model-parallel layers are split."""
    split = checkpoint._META_SPLIT
    state = model.state_dict()
    folder.mkdir()
    for r in range(n_shards):
        shard = {}
        for name, w in state.items():
            dim = split.get(name.split(".")[-2])
            shard[name] = w.chunk(n_shards, dim)[r].clone() if dim is not None else w.clone()
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
              "n_kv_heads": a.n_kv_heads, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps,
              "vocab_size": -1, "max_seq_len": a.max_seq_len}
    (folder / "params.json").write_text(json.dumps(params))


def test_meta_checkpoint_with_two_shards(tmp_path):
    model = tiny(2)
    _write_meta(model, tmp_path / "meta", 2)
    loaded = checkpoint.load(tmp_path / "meta")
    assert loaded.format == "meta" and loaded.args.vocab_size == 300
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_stories260k_tells_lily_story():
    path = shared_file("tinyllamas-stories260K", "stories260K.bin")
    loaded = checkpoint.load(path)
    assert loaded.args.dim == 64 and loaded.args.n_kv_heads == 4
    tok = loaded.tokenizer
    gen = generate(loaded.model, [[tok.bos_id]], max_new_tokens=40, eos_id=tok.eos_id)
    text = tok.decode(gen.tokens[0])
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved "
                           "to play outside in the park.")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.load(tmp_path / "empty")
    tok = shared_file("tinyllamas-stories260K", "tok512.model")
    model = tiny(2)  # vocabulary 300
    checkpoint.save(model, None, tmp_path / "native")
    with pytest.raises(checkpoint.CheckpointError, match="512 pieces but the model's vocabulary "
                                                         "is 300"):
        checkpoint.load(tmp_path / "native", tokenizer=tok)


def test_presets_match_the_paper():
    assert preset("7B").ffn_hidden_dim == 11008
    assert preset("13B").ffn_hidden_dim == 13824
    assert preset("70B").ffn_hidden_dim == 28672
    assert abs(preset("7B").num_params() / 1e9 - 6.74) < 0.01
    with torch.device("meta"):
        m = Transformer(preset("70B"))
    assert abs(sum(p.numel() for p in m.parameters()) / 1e9 - 68.98) < 0.01


def test_document_mask_blocks_attention_across_documents():
    model = tiny(2)
    from llama2.model import document_mask

    a, b = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 5))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, mask=document_mask(doc), positions=positions)
        assert (out[:, 7:] - model(b)).abs().max() < 1e-5
        assert (out[:, :7] - model(a)).abs().max() < 1e-5


def test_sampler_follows_the_distribution_and_top_k():
    from llama2.generation import sample_next

    n = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(n, 1)
    ones, g = torch.ones(n, 1), torch.Generator().manual_seed(0)
    no_k = torch.zeros(n, 1, dtype=torch.long)
    freq = torch.bincount(sample_next(logits, ones, ones, no_k, torch.rand(n, 1, generator=g)),
                          minlength=4) / n
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.02
    top2 = sample_next(logits, ones, ones, torch.full((n, 1), 2), torch.rand(n, 1, generator=g))
    assert set(top2.tolist()) == {0, 1}
    greedy = sample_next(logits, torch.zeros(n, 1), ones, no_k, None)
    assert bool((greedy == 0).all())


def test_truncate_equals_a_full_sort():
    """Top-k/top-p by ranking only the most probable tokens (growing the ranked set while a
    nucleus may reach past it) keeps exactly the tokens a full sort of the vocabulary keeps."""
    from llama2.generation import truncate

    def by_sort(logits, top_p, top_k):
        sorted_logits, order = logits.sort(-1, descending=True)
        rank = torch.arange(logits.shape[-1]).view(1, -1)
        probs = sorted_logits.softmax(-1)
        drop = ((top_k > 0) & (rank >= top_k)) | ((probs.cumsum(-1) - probs) >= top_p)
        cut = torch.full_like(logits, float("-inf")).scatter(
            -1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.where((top_k > 0) | (top_p < 1), cut, logits)

    g = torch.Generator().manual_seed(0)
    top_p = torch.tensor([[0.9], [0.5], [1.0], [1.0], [0.999], [0.95]])
    top_k = torch.tensor([[0], [0], [40], [0], [0], [300]])
    for scale in (8.0, 1.0, 0.01):  # peaked to nearly flat: nuclei of a few to ~all tokens
        logits = torch.randn(6, 5000, generator=g) * scale
        got, want = truncate(logits, top_p, top_k), by_sort(logits, top_p, top_k)
        assert torch.equal(got.isinf(), want.isinf())
        assert torch.equal(got[~got.isinf()], logits[~got.isinf()])
    assert torch.equal(truncate(logits, top_p, top_k)[3], logits[3])  # top_p 1, top_k 0


def test_generation_under_autocast():
    """Under bf16 autocast decoding follows autocast's dtype (the cache keeps the weights'):
    its log-probabilities are those of a plain forward under the same autocast."""
    model, prompts = tiny(2), [[1, 5, 6, 7], [1, 9]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate(model, prompts, max_new_tokens=8, eos_id=None)
        seq = torch.tensor([prompts[0] + got.tokens[0]])
        with torch.no_grad():
            ref = torch.log_softmax(model(seq[:, :-1]).float(), -1)[0, len(prompts[0]) - 1:]
    want = ref.gather(-1, seq[0, len(prompts[0]):].view(-1, 1)).view(-1)
    assert torch.allclose(torch.tensor(got.logprobs[0]), want, atol=0.1)


def test_greedy_is_argmax_with_its_tie_rule():
    from llama2.generation import greedy

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 32000), (16, 1024), (3, 1000)]:
        ties = torch.randint(-2, 3, shape, generator=g).float()  # many equal maxima per row
        for logits in (ties, torch.randn(shape, generator=g)):
            assert torch.equal(greedy(logits), logits.argmax(-1))


def test_compiled_decoding_equals_eager():
    """The decode step through torch.compile (inductor, on this CPU) gives the eager step's
    tokens and log-probabilities, with rows finishing at different steps (a compiled step keeps
    them, masked) and sampled rows; a second call of the same shapes compiles nothing new."""
    import shutil

    from torch._dynamo.utils import counters

    from llama2.generation import Decoder

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on CPU (inductor) needs a C++ compiler; none on PATH")

    model = tiny(2)
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    eager = generate(model, prompts, max_new_tokens=16, eos_id=None)
    eos = eager.tokens[1][3]  # row 1 ends at its 4th token, the others later or never
    kw = dict(max_new_tokens=16, eos_id=eos, temperature=[0.0, 0.0, 1.0], seed=5)
    want = generate(model, prompts, **kw)
    assert len(set(map(len, want.tokens))) > 1
    decoder = Decoder(model, compile=True)
    got = generate(model, prompts, decoder=decoder, **kw)
    assert got.tokens == want.tokens and got.finished == want.finished
    for a, b in zip(got.logprobs, want.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, prompts, decoder=decoder, **kw).tokens == want.tokens
    assert counters["stats"]["unique_graphs"] == graphs


def test_static_cache_keeps_its_shape_and_masks_padding():
    """A KVCache holds [B, kv heads, S, head dim] per layer whatever the step writes; left
    padding never reaches attention (a padded row decodes what it decodes alone)."""
    from llama2.generation import KVCache

    model = tiny(2)
    cache = KVCache(model, 3, 40)
    k = torch.randn(3, 2, 5, 16)
    full_k, _ = cache.update(1, torch.arange(10, 15), k, k)
    assert full_k.shape == (3, 2, 40, 16) and torch.equal(full_k[:, :, 10:15], k)
    assert not full_k[:, :, :10].any()
    pad = generate(model, [[1, 5, 6, 7, 8, 9, 10, 11], [1, 2]], max_new_tokens=6, eos_id=None,
                   pad_id=7)
    assert pad.tokens[1] == generate(model, [[1, 2]], max_new_tokens=6, eos_id=None).tokens[0]


def test_the_twins_rmsnorm_gives_the_models_values_bit_for_bit():
    from llama2.model import RMSNorm
    from llama2.packed import FastRMSNorm

    torch.manual_seed(0)
    for shape in [(1, 1, 128), (64, 1, 128), (16, 60, 128), (3, 7, 288)]:
        norm = RMSNorm(shape[-1])
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1]))
        x = torch.randn(shape) * 3
        with torch.inference_mode():
            assert torch.equal(FastRMSNorm(norm)(x), norm(x)), shape


def test_packed_twin_decodes_what_the_model_decodes(tmp_path):
    """Eager CPU decoding runs a twin with fused projections ([wq; wk; wv], [w1; w3]) and
    oneDNN-packed large linears where the kernel is exact here (llama2.packed): the 15M config
    (2 layers) gives transformers' greedy tokens, one prompt and a batch, and the model's own
    log-probabilities; the twin shares every other tensor and leaves the model untouched."""
    from llama2 import packed
    from llama2.generation import Decoder

    torch.manual_seed(0)
    model = Transformer(preset("15M", n_layers=2)).eval()
    model.init_weights()
    decoder = Decoder(model)
    twin = decoder.twin
    assert isinstance(twin.layers[0].attention, packed.FusedAttention)
    assert isinstance(twin.layers[0].feed_forward, packed.FusedFeedForward)
    assert type(model.layers[0].attention) is Attention and hasattr(model.layers[0].attention, "wq")
    assert type(twin.norm) is packed.FastRMSNorm and type(model.norm) is not packed.FastRMSNorm
    big = packed.PackedLinear if packed.available() else torch.nn.Linear
    assert type(twin.output) is big and type(model.output) is torch.nn.Linear
    assert twin.tok_embeddings.weight is model.tok_embeddings.weight
    checkpoint.export_hf(model, None, tmp_path)
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [[1, 500, 6000, 7, 31000, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 3400]]
    batch = generate(model, prompts, max_new_tokens=24, eos_id=None, decoder=decoder)
    plain = generate(model, prompts, max_new_tokens=24, eos_id=None,
                     decoder=Decoder(model, packed=False))
    assert batch.tokens == plain.tokens
    for a, b in zip(batch.logprobs, plain.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    for p, new in zip(prompts, batch.tokens):
        assert generate(model, [p], max_new_tokens=24, eos_id=None, decoder=decoder).tokens[0] == new
        with torch.no_grad():
            out = peer.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == new
