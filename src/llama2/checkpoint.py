"""Load and save Llama 2 checkpoints in every format users bring.

`load(path)` detects:
- the project's own format: `config.json` (with "llama2_native") + `model.safetensors` +
  `tokenizer.model`;
- a Hugging Face Llama folder: `config.json` + `model.safetensors` or sharded
  `model-0000x-of-0000y.safetensors` with an index; HF's q/k row permutation is undone;
- a Meta folder: `params.json` + `consolidated.NN.pth`, model-parallel shards merged;
- a llama2.c `.bin` file (legacy float32 format) with its SentencePiece model beside it.
`save(model, tokenizer, dir)` writes the native format, `export_hf` the Hugging Face one.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llama2.model import ModelArgs, Transformer
from llama2.tokenizer import Tokenizer
from llama2.utils import atomic_write, atomic_write_text

NATIVE_MARKER = "llama2_native"


class CheckpointError(ValueError):
    """A checkpoint that is missing, of an unknown layout, or inconsistent."""


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer | None
    args: ModelArgs
    format: str
    extra: dict  # free-form metadata of the native format (stage, step, ...)


# ---------------------------------------------------------------------------------- helpers
def _args_from_dict(d: dict) -> ModelArgs:
    names = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in d.items() if k in names})


def _find_tokenizer(folder: Path, vocab_size: int | None = None) -> Path | None:
    candidates = [folder / "tokenizer.model", folder.parent / "tokenizer.model"]
    if vocab_size:
        candidates.insert(0, folder / f"tok{vocab_size}.model")
    return next((p for p in candidates if p.is_file()), None)


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer.model a checkpoint at `path` ("PATH#fmt" too) loads with, or None."""
    p = Path(str(path).split("#", 1)[0])
    return _find_tokenizer(p if p.is_dir() else p.parent)


def _check_vocab(tok: Tokenizer | None, args: ModelArgs, where: Path) -> None:
    if tok is not None and tok.n_words != args.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.n_words} pieces but the model's "
                              f"vocabulary is {args.vocab_size}")


def _build(args: ModelArgs, state: dict[str, torch.Tensor], where: Path,
           dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    if "output.weight" not in state and "tok_embeddings.weight" in state:  # tied classifier
        state["output.weight"] = state["tok_embeddings.weight"]
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the config (missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model = model.to_empty(device="cpu")
    for name, p in model.state_dict().items():
        if p.shape != state[name].shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, the "
                                  f"config implies {tuple(p.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    # Non-persistent rope tables were left on 'meta': rebuild them.
    from llama2.model import rope_tables

    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model.eval()


# HF stores q/k rows permuted for its rotate-half rotary layout (transformers'
# convert_llama_weights_to_hf.py). These two functions are that permutation and its inverse.
def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


_HF_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


# ---------------------------------------------------------------------------------- formats
def _load_native(folder: Path, dtype: torch.dtype) -> Loaded:
    meta = json.loads((folder / "config.json").read_text())
    args = _args_from_dict(meta["model_args"])
    state = load_file(folder / "model.safetensors")
    tok_path = folder / "tokenizer.model"
    tok = Tokenizer(tok_path) if tok_path.is_file() else None
    _check_vocab(tok, args, folder)
    return Loaded(_build(args, state, folder, dtype), tok, args, "native", meta.get("extra", {}))


def _hf_args(cfg: dict) -> ModelArgs:
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"head_dim {cfg['head_dim']} != hidden_size/num_attention_heads")
    return ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        hidden_dim=cfg["intermediate_size"],
    )


def _load_hf(folder: Path, dtype: torch.dtype) -> Loaded:
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{folder}: model_type {cfg.get('model_type')!r} is not 'llama'")
    args = _hf_args(cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: config.json but no *.safetensors weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(load_file(f))
    state = {}
    for name, w in raw.items():
        if name == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = w
        elif name == "model.norm.weight":
            state["norm.weight"] = w
        elif name == "lm_head.weight":
            state["output.weight"] = w
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            sub = rest.removesuffix(".weight")
            if sub not in _HF_NAMES:
                continue  # rotary_emb.inv_freq in old exports, etc.
            if sub == "self_attn.q_proj":
                w = _hf_unpermute(w, args.n_heads)
            elif sub == "self_attn.k_proj":
                w = _hf_unpermute(w, args.n_kv_heads)
            state[f"layers.{i}.{_HF_NAMES[sub]}.weight"] = w
    tok_path = _find_tokenizer(folder)
    tok = Tokenizer(tok_path) if tok_path else None
    _check_vocab(tok, args, folder)
    return Loaded(_build(args, state, folder, dtype), tok, args, "hf", {})


# Dimension along which Meta's model-parallel layers are split (None: replicated).
_META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
               "w1": 0, "w3": 0, "w2": 1}


def _load_meta(folder: Path, dtype: torch.dtype) -> Loaded:
    params = json.loads((folder / "params.json").read_text())
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder}: params.json but no consolidated.NN.pth shards")
    parts = [torch.load(s, map_location="cpu", weights_only=True) for s in shards]
    state = {}
    for name in parts[0]:
        if name.startswith("rope.freqs"):
            continue
        kind = name.split(".")[-2]
        dim = _META_SPLIT.get(kind)
        tensors = [p[name] for p in parts]
        state[name] = tensors[0] if dim is None or len(parts) == 1 else torch.cat(tensors, dim)
    if params.get("vocab_size", -1) <= 0:  # Meta's params.json says -1
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    args = _args_from_dict(params)
    tok_path = _find_tokenizer(folder)
    tok = Tokenizer(tok_path) if tok_path else None
    _check_vocab(tok, args, folder)
    return Loaded(_build(args, state, folder, dtype), tok, args, "meta", {})


def _load_llama2c(path: Path, dtype: torch.dtype) -> Loaded:
    """llama2.c legacy (version 0) float32 checkpoint: 7 int32 header then the weights."""
    data = path.read_bytes()
    if data[:4] == b"ak42":
        raise CheckpointError(f"{path}: llama2.c version-1/2 exports are not supported; "
                              "export with --version 0 (legacy)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=vocab, hidden_dim=hidden, max_seq_len=seq_len)
    arr = np.frombuffer(data, dtype=np.float32, offset=28)
    kv = n_kv * args.head_dim
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > arr.size:
            raise CheckpointError(f"{path}: file too short for the header's config")
        t = torch.from_numpy(arr[pos:pos + n].copy()).view(*shape)
        pos += n
        return t

    L = n_layers
    state = {"tok_embeddings.weight": take(vocab, dim)}
    stacked = {
        "attention_norm": take(L, dim), "attention.wq": take(L, dim, dim),
        "attention.wk": take(L, kv, dim), "attention.wv": take(L, kv, dim),
        "attention.wo": take(L, dim, dim), "ffn_norm": take(L, dim),
        "feed_forward.w1": take(L, hidden, dim), "feed_forward.w2": take(L, dim, hidden),
        "feed_forward.w3": take(L, hidden, dim),
    }
    state["norm.weight"] = take(dim)
    take(seq_len * args.head_dim // 2)  # legacy freq_cis_real, unused
    take(seq_len * args.head_dim // 2)  # legacy freq_cis_imag, unused
    state["output.weight"] = state["tok_embeddings.weight"].clone() if shared else take(vocab, dim)
    for name, t in stacked.items():
        for i in range(L):
            state[f"layers.{i}.{name}.weight"] = t[i]
    tok_path = _find_tokenizer(path.parent, vocab)
    tok = Tokenizer(tok_path) if tok_path else None
    _check_vocab(tok, args, path)
    return Loaded(_build(args, state, path, dtype), tok, args, "llama2c", {})


def detect_format(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".bin":
            return "llama2c"
        raise CheckpointError(f"{p}: unknown checkpoint file (expected a folder or a llama2.c .bin)")
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        return "native" if cfg.get("format") == NATIVE_MARKER else "hf"
    if (p / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{p}: not a checkpoint folder (no config.json or params.json)")


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
         tokenizer: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Loaded:
    """Load any supported checkpoint; `tokenizer` overrides the one found beside it."""
    p = Path(path)
    fmt = detect_format(p)
    loader = {"native": _load_native, "hf": _load_hf, "meta": _load_meta,
              "llama2c": _load_llama2c}[fmt]
    out = loader(p, dtype)
    if tokenizer is not None:
        out.tokenizer = Tokenizer(tokenizer)
        _check_vocab(out.tokenizer, out.args, Path(tokenizer))
    out.model.to(device)
    return out


# ---------------------------------------------------------------------------------- writers
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save(model: Transformer, tokenizer: Tokenizer | None, folder: str | os.PathLike,
         extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the native format: weights, config and tokenizer, each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _contiguous(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    meta = {"format": NATIVE_MARKER, "model_args": model.args.to_dict(), "extra": extra or {}}
    # config.json last: its presence marks a complete checkpoint.
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=2) + "\n")
    return folder


def export_hf(model: Transformer, tokenizer: Tokenizer | None, folder: str | os.PathLike) -> Path:
    """Write a folder that `transformers.LlamaForCausalLM.from_pretrained` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    inv = {v: k for k, v in _HF_NAMES.items()}
    state = {}
    for name, w in _contiguous(model.state_dict()).items():
        if name == "tok_embeddings.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "norm.weight":
            state["model.norm.weight"] = w
        elif name == "output.weight":
            state["lm_head.weight"] = w
        else:
            _, i, rest = name.split(".", 2)
            sub = rest.removesuffix(".weight")
            if sub == "attention.wq":
                w = _hf_permute(w, a.n_heads)
            elif sub == "attention.wk":
                w = _hf_permute(w, a.n_kv_heads)
            state[f"model.layers.{i}.{inv[sub]}.weight"] = w.contiguous()
    atomic_write(folder / "model.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.dim, "intermediate_size": a.ffn_hidden_dim,
        "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
        "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(
            next(iter(state.values())).dtype).removeprefix("torch."),
    }
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2) + "\n")
    return folder
