"""Unit tests of ppo.py's and rollout.py's pure helpers, against plain Python loops and hand-computed values."""

from dataclasses import replace

import pytest
import torch

import ppo
from simple_rlhf import actor_critic, algorithms, checkpoints, errors, health, models, rollout, runs, update


def test_truncate_after_stop_and_scored_token():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 6, 2, 7, 8], [5, 2, 2, 9, 9], [5, 6, 7, 8, 9]])
    truncated, mask, has_stop = rollout.truncate_after_stop(responses, eos, pad)
    assert truncated.tolist() == [[5, 6, 2, 0, 0], [5, 2, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_stop.tolist() == [True, True, False]
    assert rollout.last_token_index(mask).tolist() == [2, 1, 4]
    # pad == eos (as with many tokenizers): the mask still comes from the first stop
    truncated, mask, _ = rollout.truncate_after_stop(torch.tensor([[5, 2, 2, 2]]), 2, 2)
    assert mask.tolist() == [[1, 1, 0, 0]]


def test_position_ids_follow_the_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert rollout.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_logprobs_use_the_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    got = rollout.logprobs_from_logits(logits, torch.tensor([[2]]), 0.5)
    assert got.item() == pytest.approx(torch.log_softmax(logits / 0.5, -1)[0, 0, 2].item())


def test_disable_dropout_reaches_opt_functional_dropout():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, dropout=0.5, attention_dropout=0.5,
                       activation_dropout=0.5)
    model = OPTForCausalLM(config).train()
    ids = torch.randint(0, 50, (2, 8))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is really on
    models.disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


class _SameTokenizer:
    """Enough of a tokenizer for reward_function's same-tokenizer check."""

    eos_token_id = 2

    def get_vocab(self):
        return {}


@pytest.mark.parametrize("pad", [2, 0], ids=["pad==eos", "pad!=eos"])
def test_reward_score_is_read_where_the_sequence_classifier_read_it_in_training(pad):
    """reward.py trains on prompt + answer + EOS and the classifier reads the last token that is not the pad id:
    with pad == eos (GPT-2-like tokenizers) that is the last answer token, not the EOS. PPO must read the same."""
    from transformers import OPTConfig, OPTForSequenceClassification

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=30, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, num_labels=1, pad_token_id=pad,
                       eos_token_id=2, bos_token_id=2, dropout=0.0)
    model = OPTForSequenceClassification(config).eval()
    eos = 2
    # row 0: left-padded prompt, stopped answer; row 1: answer that did not stop
    queries = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    query_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    responses, response_mask, has_stop = rollout.truncate_after_stop(torch.tensor([[10, 11, eos, 12], [13, 14, 15, 16]]), eos,
                                                          pad)
    batch = rollout.Rollout(queries, query_mask, responses, response_mask, has_stop)
    with torch.no_grad():
        got = rollout.reward_function(model, _SameTokenizer(), _SameTokenizer())(batch)
        expected = [model(torch.tensor([[5, 6, 10, 11, eos]])).logits[0, 0],  # as RewardTrainer scored it
                    model(torch.tensor([[7, 8, 9, 13, 14, 15, 16]])).logits[0, 0]]
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_generation_samples_as_the_arguments_say_not_as_the_model_generation_config_does():
    """generate() fills options left unset from the model's generation_config (hub models ship top_k,
    repetition_penalty, ...): --top_k 0 must mean all tokens, whatever the checkpoint says."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                       bos_token_id=2, dropout=0.0)
    actor = OPTForCausalLM(config).eval()
    actor.generation_config.top_k = 1  # a checkpoint's default: greedy in effect
    actor.generation_config.repetition_penalty = 100.0
    config = rollout.sampling_config(6, temperature=1.0, top_k=0, top_p=1.0, stop_token_id=2, pad_token_id=0)
    queries = torch.tensor([[5, 6, 7]] * 8)
    responses, _ = rollout.generate_responses(actor, queries, torch.ones_like(queries), config, batch_size=8)
    assert len({tuple(r) for r in responses.tolist()}) > 1, "sampling was greedy: the model's top_k was used"


def test_shard_of_shuffle_gives_processes_disjoint_slices_and_covers_a_pass():
    rows = list(range(24))
    first_pass = [rollout.shard_of_shuffle(rows, 3, position, 5, 2, process) for position in range(4) for process in (0, 1)]
    assert sorted(sum(first_pass, [])) == rows  # one pass: every row once, no process sees another's rows
    assert rollout.shard_of_shuffle(rows, 3, 2, 5, 2, 1) == first_pass[5]  # a pure function of the position
    assert rollout.shard_of_shuffle(rows, 3, 4, 5, 2, 0) != first_pass[0]  # the next pass is shuffled afresh


# ---- issue 7: health guards, score normalisation, checkpoints, sampling ------------------------------------------


SANE = {"objective/kl": 3.0, "objective/scores": 1.0, "loss/policy_avg": -0.1, "grad_norm_max": 4.0,
        "weights/actor_rms": 0.05, "weights/critic_rms": 0.5, "step": 3}
AT_START = {"weights/actor_rms": 0.04, "weights/critic_rms": 0.4}


@pytest.mark.parametrize("change, expected", [
    ({}, None),
    ({"loss/policy_avg": float("nan")}, "non-finite loss/policy_avg"),
    ({"grad_norm_max": float("inf"), "objective/scores": float("nan")}, "non-finite objective/scores, grad_norm_max"),
    ({"objective/kl": 50.5}, "objective/kl 50.5 is beyond --max_kl 50 (nats per sequence)"),
    ({"objective/kl": -60.0}, "objective/kl -60 is beyond --max_kl 50"),
    ({"weights/actor_rms": 4.5}, "weights/actor_rms 4.5 grew over 100x its 0.04 at the start"),
    ({"weights/critic_rms": 1e7}, "weights/critic_rms 1e+07 grew over 100x"),
])
def test_divergence_names_the_metric_that_blew_up(change, expected):
    found = health.divergence({**SANE, **change}, max_kl=50.0, weights_at_start=AT_START)
    assert found == expected if expected is None else found.startswith(expected), found


def test_weights_that_are_not_finite_are_never_saved():
    model = torch.nn.Module()
    model.actor, model.critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    health.check_weights_finite(None, model, "checkpoint-1")
    assert health.weight_metrics(None, model)["weights/critic_rms"] == pytest.approx(
        model.critic.weight.detach().pow(2).sum().add(model.critic.bias.detach().pow(2).sum()).div(4).sqrt().item())
    with torch.no_grad():
        model.actor.weight[0, 0] = float("inf")
    with pytest.raises(health.TrainingDiverged, match="non-finite weights/actor_rms: checkpoint-2 not written"):
        health.check_weights_finite(None, model, "checkpoint-2")


def test_pruning_keeps_other_runs_checkpoints_and_the_newest_written(tmp_path):
    """save_total_limit prunes only this run's checkpoints, newest written kept: another run's checkpoint-10 (or one
    from before run ids) stays, and after a resume from an older checkpoint the one just written is kept."""
    for step, run_id, saved_at in [(10, "other", 1.0), (2, "mine", 2.0), (6, "mine", 3.0), (3, "mine", 4.0)]:
        runs.mark_checkpoint_complete(tmp_path / f"checkpoint-{step}", step=step, run_id=run_id, saved_at=saved_at)
    runs.mark_checkpoint_complete(tmp_path / "checkpoint-20", step=20)  # written before run ids
    assert checkpoints.checkpoints_to_prune(tmp_path, "mine", 2) == [tmp_path / "checkpoint-2"]
    assert checkpoints.checkpoints_to_prune(tmp_path, "mine", 1) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-6"]


def test_rollout_log_probs_are_those_of_the_distribution_generate_sampled_from():
    """generate()'s processed scores (after its temperature and any top-k / top-p) give the same log-probs as the
    training forward pass: ppo.py samples from the full distribution at --temperature, whatever the checkpoint's
    generation_config says (here top_k 5, which would truncate it)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                       bos_token_id=2, dropout=0.0)
    actor = OPTForCausalLM(config).eval()
    actor.generation_config.top_k = 5
    generation = rollout.sampling_config(6, temperature=0.7, top_k=0, top_p=1.0, stop_token_id=2, pad_token_id=0)
    queries = torch.tensor([[5, 6, 7], [0, 8, 9]])
    query_mask = (queries != 0).long()
    with torch.no_grad():
        out = actor.generate(input_ids=queries, attention_mask=query_mask, generation_config=generation,
                             output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, queries.shape[1]:]
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    sampled = sampled.gather(2, responses.unsqueeze(2)).squeeze(2)
    batch = rollout.Rollout(queries, query_mask, responses, torch.ones_like(responses),
                            torch.zeros(2, dtype=torch.bool))
    trained = rollout.response_logprobs(actor, batch, temperature=0.7)
    assert torch.allclose(sampled, trained, atol=1e-4)


@pytest.mark.parametrize("option, flag", [({"top_k": 50}, "--top_k 50"), ({"top_p": 0.9}, "--top_p 0.9")])
def test_ppo_refuses_truncated_sampling(option, flag):
    args = ppo.PPOArguments(sft_model_path="builtin:tiny-opt", reward_model_path="builtin:tiny-opt", **option)
    with pytest.raises(errors.UserError, match=f"^{flag}: PPO samples from the full distribution at --temperature"):
        ppo.validate(args, ppo.ModelConfig())


# ---------------------------------------------------------------------------------------------------------------
# critic-free advantage estimators (rloo, grpo), on hand-made scores
# ---------------------------------------------------------------------------------------------------------------


class FakeAccelerator:
    """Process `process_index` of `num_processes`, whose gather returns all processes' rewards: `everyone`."""

    def __init__(self, everyone, num_processes=1, process_index=0):
        self.everyone, self.num_processes, self.process_index = everyone, num_processes, process_index

    def gather(self, tensor):
        return self.everyone


@pytest.mark.parametrize("estimator, extra", [("rloo", {}), ("rloo", {"normalize_advantages": True}),
                                              ("grpo", {"scale_rewards": "batch"})])
def test_group_advantages_of_two_processes_are_those_of_one_process_over_the_whole_batch(estimator, extra):
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, -1.0, 3.0, 0.5, 0.5])  # 4 prompts x 2 samples, 2 per process
    penalties = torch.tensor([-0.1, 0.0, -0.5, -0.2, 0.0, -0.3, -0.1, 0.0])
    everyone = torch.stack([scores, penalties]).T  # what gather returns: the processes' (score, penalty) rows
    args = ppo.PPOArguments(advantage_estimator=estimator, num_generations=2, **extra)
    whole = update.group_advantages(scores, penalties, args, FakeAccelerator(everyone))
    halves = [update.group_advantages(scores[4 * i:4 * i + 4], penalties[4 * i:4 * i + 4], args,
                                      FakeAccelerator(everyone, 2, i)) for i in (0, 1)]
    assert torch.allclose(torch.cat(halves), whole)
    if extra.get("normalize_advantages"):
        assert whole.mean().item() == pytest.approx(0.0, abs=1e-6) and whole.std().item() == pytest.approx(1.0, 1e-3)


def test_critic_free_advantage_is_the_sequence_reward_with_its_kl_penalty_on_every_response_token():
    """TRL's RLOO: sequence reward = score - kl_coef * (sum of the KL over the response), then the baseline; the
    advantage is the same on each response token and 0 on padding; no returns (no critic)."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, 2.0, 0.0, 4.0])
    args = ppo.PPOArguments(advantage_estimator="rloo", num_generations=2)
    advantages, returns = update.advantages_and_returns(-0.5 * kl, scores, None, mask, args, FakeAccelerator(None))
    rewards = [1.0 - 0.5 * 0.6, 2.0 - 0.5 * 1.0, 0.0 - 0.5 * 1.0, 4.0]
    per_sequence = [rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3], rewards[3] - rewards[2]]
    assert returns is None
    assert torch.allclose(advantages, torch.tensor(per_sequence)[:, None] * mask)


def tiny_actor():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                       bos_token_id=2, dropout=0.0)
    return OPTForCausalLM(config)


def test_kl_in_loss_adds_kl_coef_times_the_mean_k3_kl_and_its_gradient():
    """--kl_in_loss: loss = clipped policy loss + kl_coef * masked mean of k3(new log-probs, reference's), and no
    value loss without a critic; the term's gradient reaches the actor."""
    model = actor_critic.ActorCritic(tiny_actor(), None)
    generator = torch.Generator().manual_seed(1)
    queries, responses = torch.randint(3, 100, (3, 4), generator=generator), torch.randint(3, 100, (3, 5),
                                                                                          generator=generator)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    batch = dict(input_ids=torch.cat([queries, responses], 1), attention_mask=torch.ones(3, 9, dtype=torch.long),
                 responses=responses, mask=mask, logprobs=-torch.rand(3, 5, generator=generator) * 5,
                 advantages=torch.randn(3, 5, generator=generator), ref_logprobs=-torch.rand(3, 5, generator=generator) * 5)
    args = ppo.PPOArguments(advantage_estimator="rloo", num_generations=2, kl_in_loss=True)
    update.validate_estimator(args)
    assert args.kl_estimator == "k3"  # the default in the loss
    with_kl, stats = update.micro_batch_loss(model, batch, args, 4, kl_coef=0.3)
    without, plain_stats = update.micro_batch_loss(model, batch, replace(args, kl_in_loss=False), 4)
    new_logprobs = rollout.response_logprobs(model.actor, rollout.Rollout(queries, torch.ones_like(queries), responses,
                                                                          mask.long(), torch.zeros(3, dtype=torch.bool)),
                                             args.temperature)
    kl = algorithms.masked_mean(algorithms.kl_per_token(new_logprobs, batch["ref_logprobs"], "k3"), mask)
    assert stats["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-5) and kl.item() > 0.1
    assert (with_kl - without).item() == pytest.approx(0.3 * kl.item(), rel=1e-4)
    assert "vf_loss" not in stats and "kl_loss" not in plain_stats
    model.zero_grad()
    (with_kl - without).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.actor.parameters())


BAD_ESTIMATOR_FLAGS = {
    "unknown estimator": ({"advantage_estimator": "ppo2"}, "--advantage_estimator ppo2: use one of gae, rloo, grpo"),
    "rloo with one sample": ({"advantage_estimator": "rloo"}, "needs --num_generations (alias"),
    "grpo with one sample": ({"advantage_estimator": "grpo", "num_samples_per_prompt": 1}, "at least 2"),
    "the two names disagree": ({"num_generations": 2, "num_samples_per_prompt": 4}, "the same option under two"),
    "K does not divide the batch": ({"advantage_estimator": "rloo", "num_generations": 3}, "does not divide"),
    "a critic for rloo": ({"advantage_estimator": "rloo", "num_generations": 2, "critic_model_path": "x"},
                          "--critic_model_path applies to --advantage_estimator gae only, not rloo"),
    "scale_rewards without grpo": ({"advantage_estimator": "rloo", "num_generations": 2, "scale_rewards": "batch"},
                                   "--scale_rewards applies to --advantage_estimator grpo only"),
    "unknown scale_rewards": ({"advantage_estimator": "grpo", "num_generations": 2, "scale_rewards": "max"},
                              "use one of group, batch, none"),
    "normalize_advantages with gae": ({"normalize_advantages": True}, "applies to --advantage_estimator rloo or"),
    "k1 in the loss": ({"kl_in_loss": True, "kl_estimator": "k1"}, "--kl_estimator k1 with --kl_in_loss"),
}


@pytest.mark.parametrize("case", list(BAD_ESTIMATOR_FLAGS))
def test_ppo_refuses_estimator_flags_that_do_not_go_together(case):
    option, message = BAD_ESTIMATOR_FLAGS[case]
    args = ppo.PPOArguments(sft_model_path="builtin:tiny-opt", reward_model_path="builtin:tiny-opt", **option)
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
        ppo.validate(args, ppo.ModelConfig())


def test_num_samples_per_prompt_is_num_generations():
    args = ppo.PPOArguments(advantage_estimator="grpo", num_samples_per_prompt=4)
    update.validate_estimator(args)
    assert args.num_generations == 4 and args.kl_estimator == "k1"
    update.validate_estimator(args)  # again (bench and tests validate twice): the same
    assert args.num_generations == args.num_samples_per_prompt == 4
