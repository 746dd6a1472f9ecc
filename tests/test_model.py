"""Model, checkpoint formats and generation, checked against transformers itself."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from conftest import shared_file
from llama2 import checkpoint
from llama2.generation import generate, log_likelihood
from llama2.model import ModelArgs, Transformer, preset

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


@pytest.fixture(params=["blocked", "packed", "plain"])
def decode_path(request, monkeypatch):
    """Run a test through each decoding matmul: the blocked BLAS copy, oneDNN's packed weights
    (model.py; by default only large matrices take them) and the layers' own weights (past the
    copies' memory budget)."""
    if request.param == "plain":
        monkeypatch.setattr("llama2.model.INFERENCE_COPY_BUDGET", 0)
    if request.param == "packed":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN (mkldnn)")
        monkeypatch.setattr("llama2.model.PACKED_MIN_NUMEL", 0)
    return request.param


def test_greedy_generation_equals_transformers_batched(decode_path):
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
    freq = torch.bincount(sample_next(logits, ones, ones, no_k, g), minlength=4) / n
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.02
    top2 = sample_next(logits, ones, ones, torch.full((n, 1), 2), g)
    assert set(top2.tolist()) == {0, 1}
    greedy = sample_next(logits, torch.zeros(n, 1), ones, no_k, g)
    assert bool((greedy == 0).all())


def test_rmsnorm_inference_path_is_bitwise_the_reference_formula():
    """The fp32 no-grad path (fewer operations, for decoding) gives exactly the training path."""
    from llama2.model import RMSNorm

    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.normal_()
    for shape in [(1, 1, 96), (16, 1, 96), (4, 33, 96)]:
        x = torch.randn(shape) * 3
        with torch.no_grad():
            fast = norm(x)
        assert torch.equal(fast, norm(x))  # autograd on: the reference formula


def test_held_copies_are_made_once_and_decode_the_same(monkeypatch):
    """A block held around several generate calls (chat, the server) makes each decoding copy
    once, and the calls generate exactly what they generate alone."""
    from llama2 import model as model_mod

    model, prompts = tiny(2), [[1, 5, 6, 7], [1, 9]]
    alone = [generate(model, prompts, max_new_tokens=8, eos_id=None) for _ in range(2)]
    made = []
    real = model_mod._make_copy
    monkeypatch.setattr(model_mod, "_make_copy", lambda *a: made.append(a[1:]) or real(*a))
    with model_mod.inference_copies():
        held = [generate(model, prompts, max_new_tokens=8, eos_id=None) for _ in range(2)]
    assert [g.tokens for g in held] == [g.tokens for g in alone]
    assert [g.logprobs for g in held] == [g.logprobs for g in alone]
    assert made and len(made) == len(set(made))  # one copy per matrix group, not per call


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


def test_generation_under_autocast(decode_path, monkeypatch):
    """Under bf16 autocast decoding follows autocast's dtype on either path (oneDNN's packed
    fp32 weights would refuse the bf16 activations)."""
    model, prompts = tiny(2), [[1, 5, 6, 7], [1, 9]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate(model, prompts, max_new_tokens=8, eos_id=None)
        monkeypatch.setattr("llama2.model.PACKED_MIN_NUMEL", 2**40)  # the blocked copy only
        want = generate(model, prompts, max_new_tokens=8, eos_id=None)
    assert got.tokens == want.tokens and got.logprobs == want.logprobs


def test_greedy_is_argmax_with_its_tie_rule():
    from llama2.generation import greedy

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 32000), (16, 1024), (3, 1000)]:
        ties = torch.randint(-2, 3, shape, generator=g).float()  # many equal maxima per row
        for logits in (ties, torch.randn(shape, generator=g)):
            assert torch.equal(greedy(logits), logits.argmax(-1))


def test_decode_copies_follow_in_place_weight_updates(decode_path):
    """The weight copies that decoding multiplies by are kept between generate calls only
    while the weights are unchanged: an in-place update, even one that bypasses the version
    counter (`.data`), shows in the next call's log-probabilities, which match a plain
    forward."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                              multiple_of=16, max_seq_len=64))
    m.init_weights()
    prompt = [1, 5, 9, 13]

    def check():
        out = generate(m, [prompt, prompt[:2]], max_new_tokens=6)  # 2 rows: the packed path
        seq = torch.tensor([prompt + out.tokens[0]])
        with torch.no_grad():
            ref = torch.log_softmax(m(seq[:, :-1]).float(), -1)[0, len(prompt) - 1:]
        want = ref.gather(-1, seq[0, len(prompt):].view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor(out.logprobs[0]), want, atol=1e-4)
        return out.logprobs[0]

    before = check()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.data.mul_(1.5)  # .data: no version-counter trace
    assert check() != before


def test_kept_copies_are_reused_until_an_optimizer_step(monkeypatch):
    """Separate generate calls reuse the decoding copies (no copy on the second call); an
    optimizer step makes the next call copy again and decode the updated weights."""
    from llama2 import model as model_mod

    model, prompts = tiny(2), [[1, 5, 6, 7], [1, 9]]
    made = []
    real = model_mod._blocked_copy
    monkeypatch.setattr(model_mod, "_blocked_copy", lambda *a: made.append(1) or real(*a))
    first = generate(model, prompts, max_new_tokens=8, eos_id=None)
    n_copies = len(made)
    assert n_copies > 0
    assert generate(model, prompts, max_new_tokens=8, eos_id=None) == first
    assert len(made) == n_copies
    torch.save(model, io.BytesIO())  # nothing unpicklable left on the modules
    twin = copy.deepcopy(model)  # a copy of the model makes its own copies
    assert generate(twin, prompts, max_new_tokens=8, eos_id=None) == first
    assert len(made) == 2 * n_copies

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 5, 6, 7, 8]])).logsumexp(-1).mean().backward()
    opt.step()
    after = generate(model, prompts, max_new_tokens=8, eos_id=None)
    assert len(made) == 3 * n_copies
    seq = torch.tensor([prompts[0] + after.tokens[0]])
    with torch.no_grad():
        ref = torch.log_softmax(model(seq[:, :-1]), -1)[0, len(prompts[0]) - 1:]
    want = ref.gather(-1, seq[0, len(prompts[0]):].view(-1, 1)).view(-1)
    assert torch.allclose(torch.tensor(after.logprobs[0]), want, atol=1e-4)
    assert after.logprobs != first.logprobs


@pytest.mark.parametrize("n_in,n_out", [(64, 96), (30, 96), (64, 90), (30, 90)])
@pytest.mark.parametrize("layout", ["one sequence", "batch", "batch, oneDNN"])
def test_projection_through_each_copy_layout_equals_the_linears(n_in, n_out, layout,
                                                                 monkeypatch):
    """One row and several, through the one-sequence copy (the transposed matrix: one row cut
    along the input dimension, rows by column blocks), the batch's (output blocks) and oneDNN's
    packed one (rows only), with dimensions that the blocks divide and do not."""
    from llama2.model import inference_copies, project

    packed = layout != "one sequence"
    if layout == "batch, oneDNN":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN (mkldnn)")
        monkeypatch.setattr("llama2.model.PACKED_MIN_NUMEL", 0)
    torch.manual_seed(0)
    lins = (torch.nn.Linear(n_in, n_out, bias=False), torch.nn.Linear(n_in, 2 * n_out, bias=False))
    for x in (torch.randn(1, 1, n_in), torch.randn(3, 5, n_in)):
        with torch.inference_mode(), inference_copies(packed=packed):
            got = project(x, *lins)
        for g, lin in zip(got, lins, strict=True):
            assert torch.allclose(g, lin(x), atol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["int8 (one sequence)", "bf16 (batch)"])
def test_screened_greedy_is_the_fp32_argmax(packed, monkeypatch):
    """Each screen keeps every token that can be a row's fp32 argmax: two tokens that the
    screen's copy cannot tell apart (the fp32 winner is picked), an exact tie (the first wins),
    rows of varied norms, one row and many; NaN falls back to the full logits."""
    from llama2 import model as model_mod
    from llama2.generation import greedy, screened_greedy

    if packed and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN (mkldnn)")
    monkeypatch.setattr(model_mod, "SCREEN_MIN_NUMEL", 0)
    monkeypatch.setattr(model_mod, "_bf16_instructions", lambda: True)
    g = torch.Generator().manual_seed(0)
    V, D = 4096, 64
    w = torch.randn(V, D, generator=g) * torch.rand(V, 1, generator=g) * 2
    h = torch.randn(32, D, generator=g)
    w[7], w[11] = h[0] * 2, h[1] * 2  # each its row's largest logit by far
    w[3000] = w[7] * (1 + 1e-4)  # larger in fp32 by 1e-4, the same in bf16 and in int8
    w[2000] = w[11]  # an exact tie
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    with torch.inference_mode(), model_mod.inference_copies(packed=packed):
        screen = model_mod.screen_weight(head)
        assert screen.kind == ("bf16" if packed else "int8")
        assert int(screen.logits(h[:1]).argmax()) == 7  # the copy alone picks the wrong one
        x = torch.randn(256, D, generator=g) * 3  # the bound holds for every token of each row
        err = (screen.logits(x).float() - x @ w.t()).abs().amax(-1)
        assert bool((err <= screen.bound(x)).all()) and bool((err > 0).all())
        fallbacks = []

        def logits(x: torch.Tensor) -> torch.Tensor:
            fallbacks.append(len(x))
            return x @ w.t()

        got = screened_greedy(h, w, screen, logits)
        assert torch.equal(got, greedy(h @ w.t())) and got[:2].tolist() == [3000, 11]
        for row in range(4):
            assert screened_greedy(h[row:row + 1], w, screen, logits) == got[row]
        assert not fallbacks
        h[2, 0] = float("nan")
        assert torch.equal(screened_greedy(h, w, screen, logits), greedy(h @ w.t())) and fallbacks


def test_greedy_decoding_through_the_screen_equals_the_full_logits(monkeypatch):
    """generate without log-probabilities screens the vocabulary (forced here at a small
    size) and decodes the tokens the full logits give, before and after a weight update."""
    from llama2 import generation
    from llama2 import model as model_mod

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN (mkldnn)")
    monkeypatch.setattr(model_mod, "SCREEN_MIN_NUMEL", 0)
    monkeypatch.setattr(model_mod, "_bf16_instructions", lambda: True)
    screened = []
    real = generation.screened_greedy
    monkeypatch.setattr(generation, "screened_greedy",
                        lambda h, *a: screened.append(len(h)) or real(h, *a))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048,
                                  multiple_of=16, max_seq_len=128))
    model.init_weights(0.1)
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    for _ in range(2):
        for batch in (prompts, prompts[:1]):
            want = generate(model, batch, max_new_tokens=24, eos_id=None).tokens
            assert not screened
            assert generate(model, batch, max_new_tokens=24, eos_id=None,
                            logprobs=False).tokens == want
            assert len(screened) == 24
            screened.clear()
        with torch.no_grad():
            model.output.weight.mul_(-1.5)


def test_screened_greedy_generation_equals_transformers(monkeypatch, tmp_path):
    """The 15M config's 32k x 288 head (2 layers here) is past SCREEN_MIN_NUMEL: greedy decoding
    without log-probabilities screens it (int8 for one prompt, bf16 for a batch) and still
    decodes transformers' greedy tokens."""
    from llama2 import generation
    from llama2 import model as model_mod

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN (mkldnn)")
    monkeypatch.setattr(model_mod, "_bf16_instructions", lambda: True)  # else emulated: slower
    kinds = []
    real = generation.screened_greedy
    monkeypatch.setattr(generation, "screened_greedy",
                        lambda h, w, screen, *a: kinds.append(screen.kind) or real(h, w, screen, *a))
    torch.manual_seed(0)
    model = Transformer(preset("15M", n_layers=2)).eval()
    model.init_weights()
    checkpoint.export_hf(model, None, tmp_path)
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [[1, 500, 6000, 7, 31000, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 3400]]
    batch = generate(model, prompts, max_new_tokens=32, eos_id=None, logprobs=False).tokens
    alone = [generate(model, [p], max_new_tokens=32, eos_id=None, logprobs=False).tokens[0]
             for p in prompts]
    assert kinds.count("bf16") == 32 and kinds.count("int8") == 3 * 32
    for p, a, b in zip(prompts, alone, batch):
        with torch.no_grad():
            out = peer.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == a == b
