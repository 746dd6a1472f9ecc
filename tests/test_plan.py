"""The memory plan (llama2/plan.py) against the modules and tensors it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2 import plan
from llama2.engine import ModelOptimizer, TrainConfig
from llama2.engine.losses import causal_lm_loss
from llama2.model import ModelArgs, Transformer, preset
from llama2.reward import from_policy
from llama2.stages import pipeline

CONFIG_7B = str(Path(__file__).resolve().parents[1] / "configs" / "llama2_7b.toml")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_7b_preset_built_on_meta_has_llama_2_7b_published_parameter_count():
    policy, rm = plan.model_sizes(preset("7B"))
    assert policy.n == 6_738_415_616  # meta-llama/Llama-2-7b
    assert policy.n == preset("7B").num_params()
    # The reward model: the next-token head (32000 x 4096) out, a scalar head (4096 + 1) in.
    assert rm.n == policy.n - 32000 * 4096 + 4097


def test_the_7b_config_parses_into_the_paper_settings():
    cfg = pipeline.parse_args(["--config", CONFIG_7B])
    assert plan.pipeline_args(cfg) == preset("7B")  # vocab 32000, context 4096
    assert (cfg.sft.seq_len, cfg.sft.train.lr, cfg.sft.train.global_batch,
            cfg.sft.train.epochs) == (4096, 2e-5, 64, 2.0)
    rm = cfg.rlhf.helpful_rm.train
    assert (rm.lr, rm.epochs, rm.global_batch) == (1e-5, 1.0, 512)
    ppo = cfg.rlhf.ppo
    assert (ppo.batch_prompts, ppo.minibatch, ppo.lr, ppo.beta, ppo.clip) == (512, 64, 1e-6,
                                                                           0.01, 0.2)
    assert cfg.rlhf.rejection_sampling.k == 10 and cfg.sft.train.dtype == "bfloat16"
    assert cfg.sft.data == ["data/sft/train.jsonl"] and cfg.gatt.instruction_weights == {}


def test_trained_states_halve_from_4_to_8_gpus():
    cfg = pipeline.parse_args(["--config", CONFIG_7B])
    policy, _ = plan.model_sizes(plan.pipeline_args(cfg))
    steps = 4 * len(policy.shapes)  # AdamW's step counters: one per tensor, on every rank
    (p4, g4, o4), (p8, g8, o8) = plan.trained_state(policy, 4), plan.trained_state(policy, 8)
    assert p4 == 2 * p8 == policy.n  # 4 bytes x N / 4 GPUs
    assert g4 == 2 * g8 and o4 - steps == 2 * (o8 - steps)
    # With accumulation FSDP2 keeps the unsharded gradients until the step's last micro-batch.
    assert plan.trained_state(policy, 4, 2)[1] == plan.trained_state(policy, 8, 2)[1] == 4 * policy.n
    sft4, sft8 = (next(r for r in plan.plan(cfg, g) if r.stage == "SFT") for g in (4, 8))
    assert sft4.params == 2 * sft8.params and sft4.grads == sft8.grads == 4 * policy.n
    one = pipeline.parse_args(["--config", CONFIG_7B, "--sft.train.global_batch", "0"])
    sft4, sft8 = (next(r for r in plan.plan(one, g) if r.stage == "SFT") for g in (4, 8))
    assert sft4.grads == 2 * sft8.grads  # one micro-batch a step: reduce-scattered at once


def _measure_step(model: torch.nn.Module, loss_fn) -> tuple[int, int, int]:
    """params, grads, optimizer-state bytes of one real AdamW step (the engine's)."""
    opt = ModelOptimizer(model, TrainConfig(lr=1e-3, warmup_steps=0, max_steps=1))
    loss_fn(model).backward()
    grads = _bytes(p.grad for p in model.parameters())
    opt.step()
    state = [t for s in opt.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    return _bytes(model.parameters()), grads, _bytes(state)


def test_plan_of_the_tiny_config_equals_a_real_training_step_on_cpu():
    cfg = pipeline.parse_args([])
    args = plan.pipeline_args(cfg)
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    policy = Transformer(args)
    measured = _measure_step(policy, lambda m: causal_lm_loss(m, tokens[:, :-1], tokens[:, 1:])[0])
    sft = next(r for r in plan.plan(cfg, gpus=1) if r.stage == "SFT")
    assert (sft.params, sft.grads, sft.optimizer) == measured
    rm = from_policy(Transformer(args))
    measured = _measure_step(rm, lambda m: m(tokens, torch.tensor([31, 20])).sum())
    row = next(r for r in plan.plan(cfg, gpus=1) if r.stage == "Helpfulness RM")
    assert (row.params, row.grads, row.optimizer) == measured


@pytest.mark.parametrize("bf16", [True, False])
def test_activations_per_layer_and_token_are_what_autograd_keeps(bf16):
    """Saved-tensor hooks count the bytes a layer's forward leaves for backward (distinct
    storages, the parameters aside): the plan's formula to within 3%; under autocast, apart,
    the bf16 copy of each of the block's linear weights (`train_gathered`)."""

    def saved(n_layers: int) -> tuple[int, int, plan.Sizes]:
        args = ModelArgs(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=128,
                         multiple_of=32, max_seq_len=64)
        model = Transformer(args)
        weights = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        acts: dict[int, int] = {}
        copies: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own:
                weight = t.dtype == torch.bfloat16 and tuple(t.shape) in weights
                (copies if weight else acts)[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.hidden(torch.randint(0, 128, (3, 40)))  # 120 tokens: no weight's shape
        return sum(acts.values()), sum(copies.values()), plan.model_sizes(args)[0]

    (a1, c1, _), (a2, c2, two) = saved(1), saved(2)
    assert (a2 - a1) / (3 * 40) == pytest.approx(plan.layer_activation(two.args, bf16), rel=0.03)
    per_layer = two.block_linear // 2  # a block's linear weights (elements)
    assert c2 - c1 == (2 * per_layer if bf16 else 0)


def test_bf16_weight_copies_are_every_block_linear():
    policy, _ = plan.model_sizes(preset("7B"))
    assert policy.block_linear == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert plan.train_gathered(policy, 8, bf16=True) - plan.train_gathered(policy, 8, False) \
        == 2 * policy.block_linear


def test_frozen_models_sharded_or_replicated():
    cfg = pipeline.parse_args(["--config", CONFIG_7B])
    rows = {f: {r.stage: r for r in plan.plan(cfg, 8, f)} for f in plan.FROZEN}
    _, rm = plan.model_sizes(plan.pipeline_args(cfg))
    # x 8, but for the padding: each RM's scalar head, weight [1, 4096] and bias [1], is one
    # row on every rank.
    assert rows["sharded"]["PPO: update"].frozen * 8 \
        == rows["replicated"]["PPO: update"].frozen + 2 * 7 * 4 * (4096 + 1)
    assert rows["replicated"]["rejection sampling: sample"].frozen == 2 * 4 * rm.n


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pipeline.main(["--config", CONFIG_7B, "--dry-run", "--gpus", "8", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert "8 GPUs x 80 GiB" in out and "6,738,415,616" in out
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    assert len(lines) == 1 + len(plan.plan(pipeline.parse_args(["--config", CONFIG_7B]), 8))
    assert any(x.startswith("| evaluation |") and "| yes |" in x for x in lines)
    with pytest.raises(SystemExit):
        pipeline.main(["--config", CONFIG_7B, "--dry-run", "--frozen", "offloaded"])
