"""rollout.py's fast paths, each against the plain computation it replaces, on a tiny OPT with LoRA (seconds)."""

import pytest
import torch

from simple_rlhf import errors, rollout

TEMPERATURE = 0.7


def tiny_actor(lora_b: float = 0.05, seed: int = 0):
    """A 2-layer OPT policy with a LoRA adapter on q_proj/v_proj; lora_b != 0 makes it differ from its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=300, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, eos_token_id=2,
                       bos_token_id=2, dropout=0.0)
    actor = get_peft_model(OPTForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, lora_b) if lora_b else param.zero_()
    return actor.eval()


def prompts():
    queries, mask = rollout.left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [3, 4]], 1, "cpu")
    assert (mask == 0).any()  # left-padded
    return queries, mask


def config(**overrides):
    settings = dict(max_new_tokens=10, temperature=TEMPERATURE, top_k=0, top_p=1.0, stop_token_id=2, pad_token_id=1)
    return rollout.sampling_config(**{**settings, **overrides})


@pytest.mark.parametrize("merge_lora", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("top_k", [0, 20], ids=["all-tokens", "top-k"])
def test_logprobs_recorded_while_sampling_equal_a_fresh_forward_in_float32(merge_lora, top_k):
    """The rollout's log-probs come from generate()'s own logits instead of another forward pass: they must be
    the full-distribution log-probs at the temperature (not the top-k-warped ones) of the tokens actually sampled."""
    actor = tiny_actor()
    queries, mask = prompts()
    torch.manual_seed(1)
    sample = rollout.generate_rollout(actor, queries, mask, config(top_k=top_k), batch_size=2,
                                      logprobs_temperature=TEMPERATURE, merge_lora=merge_lora)
    fresh = rollout.response_logprobs(actor, sample, TEMPERATURE) * sample.response_mask
    assert sample.logprobs is not None and sample.logprobs.shape == sample.responses.shape
    assert sample.response_mask.sum() > 8
    assert torch.allclose(sample.logprobs, fresh, atol=1e-5), (sample.logprobs - fresh).abs().max()
    # score_rollout takes them as the actor's log-probs, and KL to the reference is 0 when LoRA B is still 0.
    start = tiny_actor(lora_b=0.0)
    torch.manual_seed(1)
    sample = rollout.generate_rollout(start, queries, mask, config(top_k=top_k), 4, logprobs_temperature=TEMPERATURE)
    scored = rollout.score_rollout(sample, start, None, None, lambda b: torch.zeros(len(b)), TEMPERATURE, 4)
    kl = (scored["logprobs"] - scored["ref_logprobs"]) * sample.response_mask
    assert kl.abs().max() < 1e-5 and scored["values"] is None


def test_merged_lora_gives_the_same_logits_and_restores_the_base_weights_bit_for_bit():
    actor = tiny_actor()
    queries, mask = prompts()
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    with torch.no_grad():
        expected = rollout.policy_logits(actor, queries, mask)
        reference = None
        with actor.disable_adapter():
            reference = rollout.policy_logits(actor, queries, mask)
        with rollout.merged_lora(actor):
            layers = [m for m in actor.modules() if hasattr(m, "merged_adapters") and m.merged_adapters]
            assert len(layers) == 4  # q_proj and v_proj of 2 layers, merged
            merged = rollout.policy_logits(actor, queries, mask)
    assert torch.allclose(merged, expected, atol=1e-5) and not torch.allclose(merged, reference, atol=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in actor.named_parameters())
    assert not any(m.merged_adapters for m in actor.modules() if hasattr(m, "merged_adapters"))
    with torch.no_grad(), actor.disable_adapter():  # the reference is untouched
        assert torch.equal(rollout.policy_logits(actor, queries, mask), reference)


def test_logits_for_the_response_only_give_the_same_logprobs():
    actor = tiny_actor()
    queries, mask = prompts()
    torch.manual_seed(2)
    sample = rollout.generate_rollout(actor, queries, mask, config(), batch_size=4)
    with torch.no_grad():
        full = rollout.policy_logits(actor, sample.input_ids, sample.attention_mask)
        assert torch.allclose(rollout.policy_logits(actor, sample.input_ids, sample.attention_mask, keep=5),
                              full[:, -5:], atol=1e-6)
    expected = torch.log_softmax(full[:, sample.context - 1 : -1] / TEMPERATURE, -1)
    expected = expected.gather(2, sample.responses[..., None]).squeeze(2)
    assert torch.allclose(rollout.response_logprobs(actor, sample, TEMPERATURE), expected, atol=1e-5)


def test_chunked_logprobs_and_entropy_equal_the_direct_ones_with_gradients():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 50, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    weights = torch.randn(3, 5)

    def direct(x):
        logp = torch.log_softmax(x / TEMPERATURE, -1)
        return logp.gather(2, tokens[..., None]).squeeze(2), -(logp.exp() * logp).sum(-1)

    got = (rollout.logprobs_from_logits(logits, tokens, TEMPERATURE),
           rollout.entropy_from_logits(logits, TEMPERATURE))
    grads = torch.autograd.grad(sum((g * weights).sum() for g in got), logits)[0]
    want = direct(logits)
    want_grads = torch.autograd.grad(sum((w * weights).sum() for w in want), logits)[0]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.allclose(grads, want_grads, atol=1e-5)


@pytest.mark.parametrize("backend", ["static"])
def test_static_cache_generates_what_the_dynamic_cache_does(backend):
    actor = tiny_actor()
    queries, mask = prompts()
    greedy = dict(greedy=True)
    dynamic, _ = rollout.generate_responses(actor, queries, mask, config(**greedy), 4)
    other, _ = rollout.generate_responses(actor, queries, mask, config(**greedy, backend=backend), 4)
    assert torch.equal(dynamic, other)


def test_unknown_generation_backend_is_a_user_error():
    with pytest.raises(errors.UserError, match="--generation_backend fast"):
        config(backend="fast")
