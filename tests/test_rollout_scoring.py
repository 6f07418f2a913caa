"""What the reward model scores and what the policy samples from: re-tokenized text, custom stop tokens, and
sampling free of the checkpoint's generation_config (issue 15, items 2, 5, 6)."""

import pytest
import torch

from simple_rlhf import rollout


def metaspace_tokenizer():
    """A tiny offline SentencePiece-style (Metaspace) tokenizer, as Llama-2, Mistral and TinyLlama decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "▁Human:", "▁What", "▁is", "▁the", "▁capital?", "▁Assistant:", "▁Paris.",
             "▁Bye", "\n"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class RecordingTokenizer:
    """A reward model's tokenizer that records the texts it is asked to encode."""

    eos_token_id, pad_token_id = 1, 0

    def __init__(self):
        self.texts = []

    def __call__(self, text):
        self.texts.append(text)
        return {"input_ids": [5] * len(text.split())}


def one_rollout(tokenizer, prompt: str, answer_ids: list[int], stop_token_id: int):
    query = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    queries = torch.tensor([[tokenizer.pad_token_id] + query])  # left-padded
    query_mask = torch.tensor([[0] + [1] * len(query)])
    responses, mask, has_stop = rollout.truncate_after_stop(torch.tensor([answer_ids]), stop_token_id,
                                                            tokenizer.pad_token_id)
    return rollout.Rollout(queries, query_mask, responses, mask, has_stop)


def test_retokenized_text_keeps_the_space_between_prompt_and_answer_for_metaspace_policies():
    policy = metaspace_tokenizer()
    prompt = "Human: What is the capital? Assistant:"
    answer = policy(" Paris.", add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    assert policy.decode(policy(prompt, add_special_tokens=False)["input_ids"]) + policy.decode(answer[:-1]) == \
        "Human: What is the capital? Assistant:Paris."  # what decoding them apart gave
    reward_tokenizer = RecordingTokenizer()
    ids, mask = rollout.retokenize(one_rollout(policy, prompt, answer, policy.eos_token_id), policy, reward_tokenizer)
    assert reward_tokenizer.texts == ["Human: What is the capital? Assistant: Paris."]
    assert ids[0, -1].item() == RecordingTokenizer.eos_token_id  # the answer stopped: the reward model's EOS follows


def test_a_custom_stop_token_is_scored_as_the_eos_reward_py_trained_on_in_both_paths(monkeypatch):
    """reward.py trains on prompt + answer + EOS. With --stop_token "\\n" the response ends in "\\n": the
    same-tokenizer path reads the EOS in its place, the re-tokenized path leaves it out of the text and appends EOS."""
    policy = metaspace_tokenizer()
    newline = policy.convert_tokens_to_ids("\n")
    prompt = "Human: What is the capital? Assistant:"
    answer = policy(" Paris.", add_special_tokens=False)["input_ids"] + [newline, newline]  # cut after the first
    batch = one_rollout(policy, prompt, answer, newline)
    scored = []
    monkeypatch.setattr(rollout, "score_at_last_token", lambda model, ids, mask: scored.append((ids, mask)) or
                        torch.zeros(len(ids)))
    rollout.reward_function(None, policy, policy, stop_token_id=newline)(batch)
    ids, mask = scored[-1]
    real = ids[0][mask[0].bool()].tolist()
    expected = policy(prompt + " Paris.", add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    assert real == expected
    reward_tokenizer = RecordingTokenizer()
    ids, _ = rollout.retokenize(batch, policy, reward_tokenizer, stop_token_id=newline)
    assert reward_tokenizer.texts == [prompt + " Paris."] and ids[0, -1].item() == RecordingTokenizer.eos_token_id
    # with the EOS as stop token nothing changes
    assert torch.equal(rollout.for_reward_model(batch, policy.eos_token_id, policy.eos_token_id), batch.responses)


def tiny_actor():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                       bos_token_id=2, dropout=0.0)
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_the_checkpoints_generation_config_cannot_reshape_sampling(peft):
    """A checkpoint's generation_config fills what ppo.py leaves None (min_new_tokens, suppress_tokens, ...), and
    those act before the log-prob recorder: off-policy samples. Sampling must follow ppo.py's settings alone, and
    the recorded log-probs must be those of a fresh forward pass."""
    actor = tiny_actor()
    actor.generation_config.suppress_tokens = list(range(3, 99))  # would leave only tokens 0, 1, 2 and 99
    actor.generation_config.min_new_tokens = 6
    if peft:
        from peft import LoraConfig, get_peft_model

        actor = get_peft_model(actor, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    config = rollout.sampling_config(6, temperature=1.0, top_k=0, top_p=1.0, stop_token_id=2, pad_token_id=0)
    queries = torch.tensor([[5, 6, 7]] * 8)
    sample = rollout.generate_rollout(actor, queries, torch.ones_like(queries), config, 8, logprobs_temperature=1.0)
    sampled = sample.responses[sample.response_mask.bool()]
    assert ((sampled >= 3) & (sampled < 99)).any(), "the checkpoint's suppress_tokens reshaped sampling"
    fresh = rollout.response_logprobs(actor, sample, 1.0) * sample.response_mask
    assert torch.allclose(sample.logprobs, fresh, atol=1e-4)
    base = actor.get_base_model() if peft else actor
    assert base.generation_config.min_new_tokens == 6  # the model's own config is given back
