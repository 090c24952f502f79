"""LoRA on the policy (issue 15): only the adapter trains, and pi_ref is the same model with the adapter off.

On the tiny embedded model (GPT-2, whose linear layers are Conv1D) and on a random Llama saved with
`save_pretrained`: at the start (B = 0) the policy and pi_ref give the very same log-probs and the KL is 0
exactly; the process holds one copy of the base weights; training moves the adapter alone, so pi_ref's
log-probs and the base weights stay bit-identical; a few iterations raise the reward; the trainable count is
`r * (d_in + d_out)` per targeted layer. Then the config's errors, saving and loading, and the reward model
that shares pi_ref's forward.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import weakref

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import text_env
from agents.base import evaluate_policy
from agents.registry import get_agent_class, make_agent, resolve_config
from rlhf_base.config import ConfigError
from rlhf_base.lm import response_logprobs
from rlhf_base.lora import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    INSTALL_HINT,
    AdapterOff,
    LoraConfig,
    add_lora,
    is_lora,
)
from rlhf_base.models import frozen_copy, load_causal_lm
from text_env.core import EnvCore
from text_env.tasks.reviews import build_tokenizer

pytest.importorskip("peft")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def shortness(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward a few iterations learn: shorter responses score higher."""
    return [-len(response) / 40 for response in responses]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A random Llama (built from a small config, no hub) with the reviews tokenizer, saved as a folder."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_envs(model: str | None = None, num_envs: int = 8, **kwargs) -> text_env.TextGenVectorEnv:
    """A vector env on a core of its own: LoRA replaces the core's policy and reference."""
    core = EnvCore(model=model, max_new_tokens=kwargs.pop("max_new_tokens", 6), **kwargs)
    return text_env.TextGenVectorEnv(num_envs=num_envs, core=core)


def expected_lora_parameters(model: torch.nn.Module, r: int, targets: tuple[str, ...]) -> int:
    """r * (d_in + d_out) summed over the targeted layers of the unwrapped model (Conv1D: weight (d_in, d_out))."""
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
        elif isinstance(module, torch.nn.Linear):
            d_in, d_out = module.in_features, module.out_features
        else:
            continue
        total += r * (d_in + d_out)
    return total


def logprobs_of(model, batch: text_env.Rollout) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start)


def storage_ptrs(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


# --------------------------------------------------------------------------------------------------------
# pi_ref is the policy with its adapter off: KL 0 at the start, one copy of the weights, unchanged by training
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny", "llama"])
def test_at_the_start_policy_and_reference_agree_exactly_on_one_copy_of_the_weights(arch, llama_dir):
    envs = make_envs(None if arch == "tiny" else llama_dir)
    unwrapped = envs.policy
    old_reference = weakref.ref(envs.reference)
    r = 4
    expected = expected_lora_parameters(unwrapped, r, GPT2_TARGETS if arch == "tiny" else LLAMA_TARGETS)
    base_params = sum(p.numel() for p in unwrapped.parameters())
    agent = make_agent("reinforce", envs, {"lora": {"r": r}, "samples_per_prompt": 2})

    assert is_lora(envs.policy) and isinstance(envs.reference, AdapterOff)
    trainable = sum(p.numel() for group in agent.optimizer.param_groups for p in group["params"])
    assert trainable == expected == sum(p.numel() for p in envs.policy.parameters() if p.requires_grad)
    assert sum(p.numel() for p in envs.reference.parameters()) == base_params  # pi_ref: the base alone
    # One copy of the base weights: pi_ref's tensors are the policy's, and the env's frozen copy is gone.
    assert storage_ptrs(envs.reference) <= storage_ptrs(envs.policy)
    gc.collect()
    assert old_reference() is None, "the env's own frozen reference is still alive"

    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logprobs_of(envs.policy, batch), logprobs_of(envs.reference, batch))
    scores = envs.core.judge.score(  # the env's judge, the policy scored teacher-forced as pi_ref is
        batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.response_start,
        batch.prompts, batch.responses,
    )  # fmt: skip
    assert np.all(scores["kl"] == 0.0), scores["kl"]
    # The KV-cached sampler's log-probs against teacher-forced pi_ref: 0 up to float error, as without LoRA.
    assert batch.kl.abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["tiny", "llama"])
def test_training_moves_the_adapter_alone_and_leaves_pi_ref_as_it_was(arch, llama_dir):
    envs = make_envs(None if arch == "tiny" else llama_dir, num_envs=8)
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(1))
    ref_before = logprobs_of(envs.reference, batch)
    base_before = {k: v.clone() for k, v in envs.reference.state_dict().items()}
    agent = make_agent("ppo", envs, {"lora": {"r": 4}, "num_minibatches": 2, "learning_rate": 1e-2})
    adapter_before = {n: p.detach().clone() for n, p in envs.policy.named_parameters() if p.requires_grad}
    agent.learn(2)

    assert all(torch.isfinite(torch.tensor(row["policy_loss"])) for row in agent.history)
    base_after = envs.reference.state_dict()
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before), "a base weight moved"
    moved = [
        n
        for n, p in envs.policy.named_parameters()
        if p.requires_grad and not torch.equal(p, adapter_before[n])
    ]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)
    assert torch.equal(logprobs_of(envs.reference, batch), ref_before), "pi_ref changed"
    assert not torch.equal(logprobs_of(envs.policy, batch), ref_before), "the policy did not move"
    assert agent.history[-1]["kl"] > 0
    # A copy of pi_ref (e.g. `trainable_copy(envs.reference)` for a new policy) is a plain frozen base model.
    copied = frozen_copy(envs.reference)
    assert not is_lora(copied) and not any(p.requires_grad for p in copied.parameters())
    assert torch.equal(logprobs_of(copied, batch), ref_before)


@pytest.mark.parametrize("name", ["reinforce", "ppo"])
def test_a_few_lora_iterations_raise_the_reward(name):
    """A reward a few steps learn (shorter responses), 32 envs, LoRA r = 8 at lr 3e-3: ~1 s an iteration."""
    envs = make_envs(num_envs=32, max_new_tokens=12, reward_model=shortness, gold_reward="none")
    before = evaluate_policy(envs, num_episodes=64, seed=123)["rm_score"]
    config = {"lora": {"r": 8}, "learning_rate": 3e-3}
    config |= {"samples_per_prompt": 4} if name == "reinforce" else {"num_minibatches": 2, "epochs": 2}
    make_agent(name, envs, config).learn(8 if name == "reinforce" else 4)
    after = evaluate_policy(envs, num_episodes=64, seed=123)["rm_score"]
    assert after > before + 0.4, (before, after)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "remax", "reinforce_pp", "online_dpo", "raft"])
def test_every_policy_gradient_agent_trains_an_adapter_against_the_base(name):
    envs = make_envs(num_envs=8)
    settings = (
        {"samples_per_prompt": 2, "prompts_per_iteration": 4, "batch_size": 2} if name == "raft" else {}
    )
    settings |= {"samples_per_prompt": 2} if name in ("grpo", "dr_grpo") else {}
    agent = get_agent_class(name)(envs, resolve_config(get_agent_class(name), {**settings, "lora": {"r": 2}}))
    base_before = {k: v.clone() for k, v in envs.reference.state_dict().items()}
    agent.learn(1)
    assert isinstance(envs.reference, AdapterOff)
    assert all(torch.equal(v, base_before[k]) for k, v in envs.reference.state_dict().items())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in envs.policy.named_parameters()), (
        "the adapter did not move"
    )


# --------------------------------------------------------------------------------------------------------
# The config and its errors
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"r": 0}, r"LoraConfig.r = 0: must be >= 1 \(valid range \[1, inf\)\)"),
        ({"alpha": 0.0}, r"LoraConfig.alpha = 0.0: must be > 0 \(valid range \(0, inf\)\)"),
        ({"dropout": 1.0}, r"LoraConfig.dropout = 1.0: must be >= 0 and < 1 \(valid range \[0, 1\)\)"),
        ({"target_modules": "q_proj"}, "lora.target_modules must be 'all-linear' or a list of module names"),
        ({"target_modules": []}, "non-empty list of module names"),
    ],
)
def test_bad_lora_settings_name_the_key_and_the_range(values, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**values)


def test_lora_reads_from_yaml_overrides_and_says_what_is_wrong():
    ppo = get_agent_class("ppo")
    assert resolve_config(ppo).lora is None  # full fine-tuning by default
    cfg = resolve_config(ppo, None, ["lora.r=16", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora == LoraConfig(r=16, target_modules=["q_proj", "v_proj"]) and cfg.lora.scaling == 1.0
    with pytest.raises(
        ConfigError, match=r"LoraConfig.r = -1 at 'lora.r' in override 'lora.r=-1': must be >= 1"
    ):
        resolve_config(ppo, None, ["lora.r=-1"])
    with pytest.raises(ConfigError, match="unknown key 'rank' at 'lora.rank'.*valid keys for 'lora'"):
        resolve_config(ppo, None, ["lora.rank=4"])


def test_targets_that_match_nothing_and_dropout_that_never_acts_are_refused():
    envs = make_envs()
    with pytest.raises(ValueError, match=r"matches no layer of GPT2LMHeadModel.*named \['c_attn'"):
        make_agent("reinforce", envs, {"lora": {"target_modules": ["q_proj"]}, "samples_per_prompt": 2})
    with pytest.raises(
        ValueError, match="lora.dropout=0.1 would never act: ppo keeps the policy in eval mode"
    ):
        make_agent("ppo", make_envs(), {"lora": {"dropout": 0.1}})
    raft = {"samples_per_prompt": 2, "prompts_per_iteration": 4, "batch_size": 2}
    make_agent("raft", make_envs(), {**raft, "lora": {"dropout": 0.1}})  # RAFT fine-tunes in train mode


def test_a_policy_that_is_not_pi_ref_or_already_adapted_is_refused():
    envs = make_envs()
    with torch.no_grad():
        next(envs.policy.parameters()).add_(0.01)  # trained (or swapped) before LoRA was asked for
    with pytest.raises(ValueError, match="the env's policy is not pi_ref"):
        make_agent("ppo", envs, {"lora": {}})
    envs = make_envs()
    make_agent("ppo", envs, {"lora": {}})
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        make_agent("ppo", envs, {"lora": {}})


def test_without_peft_asking_for_lora_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a)
    )
    model, _ = load_causal_lm(None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lora\]'") as err:
        add_lora(model, LoraConfig())
    assert str(err.value) == INSTALL_HINT


def test_full_fine_tuning_is_untouched():
    envs = make_envs()
    reference, policy = envs.reference, envs.policy
    make_agent("ppo", envs)
    assert envs.reference is reference and envs.policy is policy and not is_lora(policy)


# --------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------
def test_the_adapter_saves_as_safetensors_and_loads_back_into_a_fresh_agent(tmp_path):
    envs = make_envs()
    config = {"lora": {"r": 4}, "num_minibatches": 2, "learning_rate": 1e-2}
    agent = make_agent("ppo", envs, config)
    agent.learn(1)
    agent.save(tmp_path / "policy")
    files = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert {ADAPTER_WEIGHTS, "adapter_config.json", "value_head.safetensors"} <= set(files)
    assert "model.safetensors" not in files  # the adapter alone: the base is the env's model
    saved = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16.0 and saved["peft_type"] == "LORA"

    fresh = make_envs()
    loaded = make_agent("ppo", fresh, config)
    loaded.load(tmp_path / "policy")
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logprobs_of(fresh.policy, batch), logprobs_of(envs.policy, batch))
    assert torch.equal(loaded.value_head.weight, agent.value_head.weight)

    with pytest.raises(ValueError, match="holds a LoRA adapter, not a whole model"):
        make_agent("ppo", make_envs()).load(tmp_path / "policy")
    wrong_rank = make_agent("ppo", make_envs(), {"lora": {"r": 2}})
    with pytest.raises(ValueError, match="another lora.r"):
        wrong_rank.load(tmp_path / "policy")


def test_save_merged_writes_a_model_any_loader_reads_and_keeps_the_adapter(tmp_path, llama_dir):
    envs = make_envs(llama_dir)
    agent = make_agent("reinforce", envs, {"lora": {"r": 4, "save_merged": True}, "samples_per_prompt": 2,
                                           "learning_rate": 1e-2})  # fmt: skip
    agent.learn(2)
    base_before = {k: v.clone() for k, v in envs.reference.state_dict().items()}
    agent.save(tmp_path / "policy")
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "policy" / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()
    assert all(
        torch.equal(v, base_before[k]) for k, v in envs.reference.state_dict().items()
    )  # merged a copy

    merged, _ = load_causal_lm(tmp_path / "policy")
    assert not is_lora(merged)
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logprobs_of(merged, batch), logprobs_of(envs.policy, batch), atol=1e-5, rtol=0)
    fresh = make_envs(llama_dir)
    make_agent("reinforce", fresh, {"lora": {"r": 4}, "samples_per_prompt": 2}).load(tmp_path / "policy")
    assert torch.equal(logprobs_of(fresh.policy, batch), logprobs_of(envs.policy, batch))


# --------------------------------------------------------------------------------------------------------
# The reward model that reads pi_ref's log-probs still shares the reference forward
# --------------------------------------------------------------------------------------------------------
def test_a_reward_model_reading_pi_ref_still_shares_the_reference_forward(core, tmp_path):
    from tests.test_reward_models import build_reward_model

    torch.manual_seed(0)
    rm = build_reward_model(logprob_features=True)  # its frozen LM: a copy of the tiny model, pi_ref here
    envs = make_envs(reward_model=rm, num_envs=8)
    make_agent("reinforce", envs, {"lora": {"r": 4}, "samples_per_prompt": 2, "learning_rate": 1e-2}).learn(1)
    judge = envs.core.judge
    assert isinstance(envs.reference, AdapterOff) and judge.shared_reward_model() is rm
    calls = []
    hook = rm.reference.register_forward_hook(lambda *_: calls.append(1))
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert calls == [], "the reward model's own frozen LM ran: nothing was shared"
    torch.testing.assert_close(batch.rm_scores, rm.score(batch.prompts, batch.responses), atol=1e-4, rtol=0)
    assert batch.kl.abs().max() > 1e-3  # the adapter moved: the KL is the policy's against the base
