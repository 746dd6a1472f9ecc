"""The memory plan: what every recipe stage holds per GPU, read off a pipeline config, before a run.

Its one job: for a `PipelineConfig`, a number of GPUs and their memory, print (markdown) each
stage's bytes per GPU under FSDP2 as this code base runs it, and whether they fit. Nothing is
trained, loaded or written:

    llama2 pipeline --config configs/llama2_7b.toml --dry-run --gpus 8 --gpu-memory 80
    python -m llama2.plan --config configs/llama2_7b.toml --gpus 8 [--frozen sharded|replicated]

Parameters are counted from the real modules, built on the meta device: the policy
`Transformer(args)` and a reward model `reward.from_policy(Transformer(args))` (the next-token
head replaced by a scalar head). N below is a model's parameter count, g the GPUs, "sharded"
what FSDP2 leaves a rank: every tensor split on dim 0, padded, ceil(d0 / g) rows of it.

A trained model (engine/trainer.py, engine/optim.py, engine/distributed.py):
- params: fp32 master weights, sharded: 4N/g.
- grads: fp32, reduce-scattered after a step's last micro-batch (`set_requires_gradient_sync`).
  Until then FSDP2 keeps every block's *unsharded* gradient: with accumulation (more than one
  micro-batch per rank and step) each rank holds 4N, else 4N/g. PPO steps once per minibatch.
- optimizer: AdamW's two moments, fp32, sharded (8N/g), and a 4-byte `step` per tensor.
- gathered: `shard_model` applies fully_shard per block and to the root, with no
  MixedPrecisionPolicy, so gathered weights are fp32: the root's (embeddings, final norm,
  output head; the root keeps them from forward through backward) and two blocks' (the one
  computing, the next being gathered). Under bf16 autocast (`train.dtype` bfloat16; "auto" is
  bf16 on a GPU) each linear weight is cast to bf16 in the forward pass and autograd keeps that
  copy for backward: 2 bytes x every block's linear weights, the whole model, not a shard.
- activations of one micro-batch (b sequences of s tokens), no activation checkpointing: what
  autograd keeps in this model (tests/test_plan.py measures it with saved-tensor hooks), per
  layer and token, D = dim, K = kv_heads x head_dim, F = feed-forward width, H = heads:
      bf16 autocast  30D + 4K + 8F + 4H + 8 bytes
      fp32           32D + 8K + 16F + 4H + 8 bytes
  (Korthikanti et al. 2022 count 34D for a 16-bit GPT layer with F = 4D; the bf16 line gives
  66D for that shape (55.5D for Llama 2's F = 2.6875D): the residual stream stays fp32,
  each RMSNorm keeps its fp32 input and output, each linear its own bf16 cast of its input;
  SDPA keeps q, k, v, its output and the log-sum-exp, no s x s matrix.)
  Once per micro-batch: the final norm (8D a token); for a language-model loss the fused
  cross-entropy of engine/losses.py: the fp32 gradients it saves for the hidden states (4D a
  token) and the output weight (4VD), its [chunk, V] logits buffers (2 + 4 bytes an entry) and
  the bf16 output weight it multiplies; where the stage passes a boolean attention mask
  (packed SFT rows, reward-model pairs, `data.doc_mask`), the mask (b s^2 bytes) and, per
  layer, the additive bias SDPA makes of it and keeps (b s^2 x 2 bytes, 4 in fp32).
Frozen models (the PPO reference policy, the reward models): fp32 as loaded, "sharded" (4N/g,
a block gathered at a time to score) or "replicated" (4N on every rank): `frozen`.
Generation (`respond` -> `generation.generate`): the policy's weights gathered once per
generation phase (full fp32 on every rank), the static KV cache in the weights' dtype (K and V,
[rows, kv_heads, len, head_dim] a layer) for the rank's share of the stage's sequences
(global / g), in calls of at most respond's `max_batch_tokens` cache slots; and one call's
prefill: one layer's fp32 tensors (4 max(6D + 5K, 3D + 3F) bytes a token), its mask as an
fp32 bias, the last position's logits. Scoring passes (no autograd) hold the same working set.
Lengths are the worst case: every sequence as long as the stage allows (its seq_len or
max_len; for generation the context, since respond cuts a prompt to fit the context with its
answer). A stage with phases has a row per phase. "fits": total <= 90% of the GPU's memory (the
rest for the CUDA context, NCCL buffers, allocator fragmentation). GiB (2^30 bytes) throughout.

Under torchrun every stage runs as the plan counts it: training under FSDP2, generation with
the policy's weights gathered on every rank once per phase and freed after, PPO's policy and
value model sharded and its frozen models as `frozen` says (`--frozen`, else the config's
rlhf.ppo.frozen). Not counted: the rotary tables, CUDA workspaces, and PyTorch's caching allocator's
fragmentation beyond the headroom.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, fields

import torch
from torch import nn

from llama2.engine.config import TrainConfig
from llama2.engine.losses import _chunk_rows
from llama2.model import ModelArgs, Transformer
from llama2.respond import respond
from llama2.reward import from_policy, score

GiB = float(1 << 30)
HEADROOM = 0.9  # a stage fits when its total is at most this share of the GPU's memory
FROZEN = ("sharded", "replicated")


# ------------------------------------------------------------------------- the modules
@dataclass
class Sizes:
    """What the plan reads off a built module: every parameter's shape, split as shard_model
    splits them (the blocks of its ModuleLists, and the rest: the root)."""

    args: ModelArgs
    shapes: list[tuple[int, ...]]
    root: list[tuple[int, ...]]
    block: list[tuple[int, ...]]  # one block
    block_linear: int  # elements of every block's 2-D weights (the autocast copies)
    lm_head: bool  # a next-token head (the fused cross-entropy) or a scalar head

    @property
    def n(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _sizes(model: nn.Module, args: ModelArgs, lm_head: bool) -> Sizes:
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    in_block = {id(p) for b in blocks for p in b.parameters()}
    return Sizes(args, [tuple(p.shape) for p in model.parameters()],
                 [tuple(p.shape) for p in model.parameters() if id(p) not in in_block],
                 [tuple(p.shape) for p in blocks[0].parameters()] if blocks else [],
                 sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2), lm_head)


def model_sizes(args: ModelArgs) -> tuple[Sizes, Sizes]:
    """The policy and a reward model of `args`, built on the meta device (no memory)."""
    with torch.device("meta"):
        policy = Transformer(args)
        rm = from_policy(Transformer(args))
    return _sizes(policy, args, True), _sizes(rm, args, False)


def pipeline_args(cfg) -> ModelArgs:
    """The policy's ModelArgs as the pipeline builds them (its tokenizer: world.tokenizer_vocab_size)."""
    section = cfg.pretrain.model
    return section.build_args(section.vocab_size or cfg.world.tokenizer_vocab_size)


def sharded(shapes: list[tuple[int, ...]], gpus: int, elem: int) -> int:
    """Bytes a rank holds of `shapes` sharded on dim 0 over `gpus` (FSDP2 pads to ceil)."""
    if gpus == 1:
        return sum(math.prod(s) for s in shapes) * elem
    return sum(math.ceil(s[0] / gpus) * math.prod(s[1:]) * elem if s else elem for s in shapes)


# ------------------------------------------------------------------------- the pieces
def trained_state(m: Sizes, gpus: int, accumulation: int = 1) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes of a trained model on one rank."""
    params = sharded(m.shapes, gpus, 4)
    grads = params if accumulation == 1 else 4 * m.n  # unsharded until the step's last micro-batch
    optimizer = 2 * params + 4 * len(m.shapes)  # exp_avg, exp_avg_sq; step
    return params, grads, optimizer


def frozen_bytes(models: list[Sizes], gpus: int, frozen: str) -> int:
    if frozen not in FROZEN:
        raise ValueError(f"frozen: expected one of {FROZEN}, got {frozen!r}")
    return sum(sharded(m.shapes, gpus if frozen == "sharded" else 1, 4) for m in models)


def layer_activation(args: ModelArgs, bf16: bool) -> int:
    """Bytes autograd keeps per layer and token (module docstring)."""
    D, K, F, H = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim, args.n_heads
    return (30 * D + 4 * K + 8 * F if bf16 else 32 * D + 8 * K + 16 * F) + 4 * H + 8


def forward_working_set(args: ModelArgs) -> int:
    """Bytes a token of a no-autograd fp32 forward pass needs in its busiest layer."""
    D, K, F = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return 4 * max(6 * D + 5 * K, 3 * D + 3 * F)


def train_activations(m: Sizes, rows: int, seq: int, bf16: bool, mask: bool,
                      fused_loss: bool = True) -> int:
    """One micro-batch of `rows` sequences of `seq` tokens through forward, kept for backward;
    a policy's loss through the fused cross-entropy (`fused_loss`)."""
    a, tokens = m.args, rows * seq
    out = a.n_layers * tokens * layer_activation(a, bf16) + tokens * 8 * a.dim  # + final norm
    if m.lm_head and fused_loss:
        chunk = min(_chunk_rows(a.vocab_size), tokens)  # the loss's logits block
        out += tokens * 4 * a.dim + 4 * a.vocab_size * a.dim  # saved grad_h, grad_w (fp32)
        out += chunk * a.vocab_size * (6 if bf16 else 4) + (2 * a.vocab_size * a.dim if bf16 else 0)
    if mask:
        out += rows * seq * seq * (1 + a.n_layers * (2 if bf16 else 4))
    return out


def gathered_blocks(m: Sizes, gpus: int) -> int:
    """fp32 weights FSDP2 gathers for a pass: the root's and two blocks' (none on one rank)."""
    if gpus == 1:
        return 0
    return 4 * (sum(math.prod(s) for s in m.root) + 2 * sum(math.prod(s) for s in m.block))


def train_gathered(m: Sizes, gpus: int, bf16: bool) -> int:
    """Gathered fp32 weights and, under autocast, the bf16 copies kept for backward."""
    return gathered_blocks(m, gpus) + (2 * m.block_linear if bf16 else 0)


def default(fn, name: str):
    """A keyword's default in the code (respond's max_batch_tokens, score's batch_size)."""
    return inspect.signature(fn).parameters[name].default


@dataclass
class Generation:
    gathered: int
    kv: int
    activations: int
    sizes: str


def generation(m: Sizes, sequences: int, gpus: int, max_new_tokens: int) -> Generation:
    """The rank's share of `sequences` generated at the context's length (the worst case)."""
    a = m.args
    length = a.max_seq_len
    prompt = length - max(1, min(max_new_tokens, length // 2))
    rows = math.ceil(sequences / gpus)
    cap = default(respond, "max_batch_tokens") or rows * length
    per_call = rows if rows * length <= cap else max(1, cap // length)
    kv = 2 * a.n_layers * per_call * length * a.n_kv_heads * a.head_dim * 4
    prefill = per_call * prompt * forward_working_set(a) + per_call * prompt * length * 5
    prefill += 2 * per_call * a.vocab_size * 4
    return Generation(4 * m.n if gpus > 1 else 0, kv, prefill,
                      f"gen {rows} rows/rank, {per_call} a call x {length}")


def scoring(m: Sizes, rows: int, seq: int, logits_positions: int = 0) -> int:
    """A no-autograd forward pass of `rows` x `seq` tokens (+ fp32 log-probs at some positions)."""
    a = m.args
    return rows * seq * forward_working_set(a) + rows * logits_positions * a.vocab_size * 8


def accumulation(train: TrainConfig, gpus: int, seq: int) -> int:
    total = train.global_sequences(gpus, seq)
    return max(1, math.ceil(total / (train.micro_batch_size * gpus)))


# ------------------------------------------------------------------------- the plan
@dataclass
class Row:
    stage: str
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    frozen: int = 0
    gathered: int = 0
    kv: int = 0
    activations: int = 0
    sizes: str = ""

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name not in ("stage", "sizes"))

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total <= HEADROOM * gpu_memory_gib * GiB


def _bf16(train: TrainConfig) -> bool:
    return train.dtype in ("bfloat16", "auto")  # auto: bf16 on any GPU with it


def train_row(stage: str, m: Sizes, train: TrainConfig, gpus: int, rows: int, seq: int,
              mask: bool, frozen: int = 0, what: str = "") -> Row:
    """A training phase: micro-batches of `rows` sequences of `seq` tokens (what: how to say it)."""
    accum = accumulation(train, gpus, seq)
    params, grads, opt = trained_state(m, gpus, accum)
    bf16 = _bf16(train)
    return Row(stage, params, grads, opt, frozen, train_gathered(m, gpus, bf16), 0,
               train_activations(m, rows, seq, bf16, mask),
               f"{what or f'{rows} x {seq} tokens'}, {accum} micro-batch"
               f"{'es' if accum > 1 else ''}/step, {'bf16' if bf16 else 'fp32'}")


def gen_row(stage: str, m: Sizes, gpus: int, sequences: int, max_new_tokens: int,
            params: int, optimizer: int = 0, frozen: int = 0) -> Row:
    g = generation(m, sequences, gpus, max_new_tokens)
    return Row(stage, params, 0, optimizer, frozen, g.gathered, g.kv, g.activations, g.sizes)


def plan(cfg, gpus: int, frozen: str = "sharded") -> list[Row]:
    """A row per stage (and phase) of the pipeline config `cfg` on `gpus` ranks."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    args = pipeline_args(cfg)
    policy, rm = model_sizes(args)
    ctx = args.max_seq_len
    p_params = trained_state(policy, gpus)[0]
    rows: list[Row] = []

    pt = cfg.pretrain
    rows.append(train_row("pretraining", policy, pt.train, gpus, pt.train.micro_batch_size,
                          pt.data.seq_len, pt.data.doc_mask))
    sft = cfg.sft
    rows.append(train_row("SFT", policy, sft.train, gpus, sft.train.micro_batch_size,
                          min(sft.seq_len, ctx), True))
    for name, rc in (("Helpfulness RM", cfg.rlhf.helpful_rm), ("Safety RM", cfg.rlhf.safety_rm)):
        L = min(rc.max_len or ctx, ctx)  # a pair: chosen and rejected, each up to L tokens
        mb = rc.train.micro_batch_size
        rows.append(train_row(name, rm, rc.train, gpus, 2 * mb, L, True,
                              what=f"{mb} pair{'s' if mb > 1 else ''} x 2 x {L} tokens"))

    # Rejection sampling: K samples of each prompt, scored by both RMs, then fine-tuning.
    rs = cfg.rlhf.rejection_sampling
    two_rms = frozen_bytes([rm, rm], gpus, frozen)
    rows.append(gen_row("rejection sampling: sample", policy, gpus, rs.n_prompts * rs.k,
                        rs.max_new_tokens, p_params, frozen=two_rms))
    score_rows = default(score, "batch_size")
    rows.append(Row("rejection sampling: score", p_params, frozen=two_rms,
                    gathered=gathered_blocks(rm, gpus) if frozen == "sharded" else 0,
                    activations=scoring(rm, score_rows, ctx),
                    sizes=f"RMs score {score_rows} x {ctx} tokens a pass"))
    # The code keeps both RMs loaded while it fine-tunes on the best samples.
    rows.append(train_row("rejection sampling: fine-tune", policy, rs.train, gpus,
                          rs.train.micro_batch_size, min(rs.seq_len, ctx), True, frozen=two_rms))

    # PPO: policy and value model trained; reference policy and both RMs frozen.
    ppo = cfg.rlhf.ppo
    pol, val = trained_state(policy, gpus), trained_state(rm, gpus)
    ppo_frozen = frozen_bytes([policy, rm, rm], gpus, frozen)
    states = {"params": pol[0] + val[0], "optimizer": pol[2] + val[2], "frozen": ppo_frozen}
    rows.append(gen_row("PPO: rollout", policy, gpus, ppo.batch_prompts, ppo.max_new_tokens,
                        **states))
    per_rank = math.ceil(ppo.batch_prompts / gpus)
    answer = max(1, min(ppo.max_new_tokens, ctx // 2))
    rows.append(Row("PPO: score (reference, value)", **states,
                    gathered=gathered_blocks(policy, gpus) if frozen == "sharded" else 0,
                    activations=scoring(policy, per_rank, ctx, answer),
                    sizes=f"{per_rank} x {ctx} tokens in one pass, log-probs of {answer}"))
    b = math.ceil(ppo.minibatch / gpus)
    # response_logprobs: the answer's hidden states, fp32 logits, log-softmax, exp (entropy)
    act = train_activations(policy, b, ctx, False, False, fused_loss=False)
    act += b * answer * (4 * args.dim + 12 * args.vocab_size)
    act += train_activations(rm, b, ctx, False, False)
    rows.append(Row("PPO: update", pol[0] + val[0], pol[1] + val[1], pol[2] + val[2], ppo_frozen,
                    train_gathered(policy, gpus, False) + train_gathered(rm, gpus, False), 0, act,
                    f"{b} x {ctx} tokens x 2 models, 1 step/minibatch, fp32"))

    # Ghost Attention: sample the dialogs' turns, then fine-tune on them.
    ga = cfg.gatt
    rows.append(gen_row("Ghost Attention: sample", policy, gpus, ga.n_dialogs * ga.k,
                        ga.max_new_tokens, p_params))
    rows.append(train_row("Ghost Attention: fine-tune", policy, ga.train, gpus,
                          ga.train.micro_batch_size, min(ga.seq_len, ctx), True))
    # Context distillation: answers with and without the preprompt, gated by the Safety RM.
    di = cfg.distill
    one_rm = frozen_bytes([rm], gpus, frozen)
    n = di.n_safety + di.n_helpful + di.n_borderline
    rows.append(gen_row("context distillation: generate", policy, gpus, n, di.max_new_tokens,
                        p_params, frozen=one_rm))
    rows.append(train_row("context distillation: fine-tune", policy, di.train, gpus,
                          di.train.micro_batch_size, min(di.seq_len, ctx), True))
    ev = cfg.eval
    rows.append(gen_row("evaluation", policy, gpus, ev.n_prompts, ev.max_new_tokens, p_params))
    return rows


# ------------------------------------------------------------------------- the table
COLUMNS = ("params", "grads", "optimizer", "frozen", "gathered", "kv", "activations")
HEADERS = ("params", "grads", "optimizer", "frozen models", "gathered weights", "KV cache",
           "activations")


def render(cfg, rows: list[Row], gpus: int, gpu_memory: float, frozen: str) -> str:
    args = pipeline_args(cfg)
    policy, rm = model_sizes(args)
    head = (f"Memory per GPU, GiB: {gpus} GPU{'s' if gpus > 1 else ''} x {gpu_memory:g} GiB, "
            f"fits at <= {HEADROOM * gpu_memory:.1f} GiB ({100 - 100 * HEADROOM:.0f}% "
            f"headroom); policy {policy.n:,} parameters, reward model {rm.n:,}; frozen models "
            f"{frozen}; context {args.max_seq_len}; worst-case lengths (llama2/plan.py)")
    lines = [head, "",
             "| stage | " + " | ".join(HEADERS) + " | total | fits | sizes |",
             "|---|" + "---:|" * (len(HEADERS) + 1) + "---|---|"]
    for r in rows:
        cells = [f"{getattr(r, c) / GiB:.1f}" for c in COLUMNS]
        lines.append(f"| {r.stage} | " + " | ".join(cells) + f" | {r.total / GiB:.1f} | "
                     f"{'yes' if r.fits(gpu_memory) else 'no'} | {r.sizes} |")
    return "\n".join(lines)


def split_flags(argv: list[str]) -> tuple[list[str], int, float, str | None]:
    """Take --dry-run, --gpus N, --gpu-memory GIB and --frozen MODE (None: the config's
    rlhf.ppo.frozen) out of `argv`."""
    rest, gpus, memory, frozen = [], 8, 80.0, None
    it = iter(argv)
    for a in it:
        key, eq, value = a.partition("=")
        if key == "--dry-run":
            continue
        if key in ("--gpus", "--gpu-memory", "--gpu_memory", "--frozen"):
            value = value if eq else next(it, "")
            try:
                if key == "--gpus":
                    gpus = int(value)
                elif key == "--frozen":
                    frozen = value
                else:
                    memory = float(value)
            except ValueError:
                raise SystemExit(f"{key}: expected a number, got {value!r}") from None
            continue
        rest.append(a)
    if frozen is not None and frozen not in FROZEN:
        raise SystemExit(f"--frozen: expected one of {', '.join(FROZEN)}, got {frozen!r}")
    if gpus < 1 or memory <= 0:
        raise SystemExit("--gpus and --gpu-memory must be positive")
    return rest, gpus, memory, frozen


def main(argv: list[str]) -> None:
    """Print the plan of a pipeline config (`llama2 pipeline ... --dry-run`); writes nothing."""
    from llama2.stages.pipeline import parse_args

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    rest, gpus, memory, frozen = split_flags(argv)
    cfg = parse_args(rest)
    frozen = frozen or cfg.rlhf.ppo.frozen
    print(render(cfg, plan(cfg, gpus, frozen), gpus, memory, frozen))


if __name__ == "__main__":
    main(sys.argv[1:])
