"""simple_rlhf/algorithms.py on hand-made tensors: each estimator, loss and statistic against its formula."""

import math

import pytest
import torch

from simple_rlhf import algorithms


def test_masked_mean_var_whiten_ignore_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]]).float()
    kept = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    mean = sum(kept) / 6
    assert algorithms.masked_mean(values, mask).item() == pytest.approx(mean)
    variance = sum((v - mean) ** 2 for v in kept) / 5  # unbiased
    assert algorithms.masked_var(values, mask).item() == pytest.approx(variance)
    whitened = algorithms.masked_whiten(values, mask)
    assert algorithms.masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert algorithms.masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert whitened[0, 3].item() == 0.0 and whitened[1, 2].item() == 0.0
    kept_mean = algorithms.masked_whiten(values, mask, shift_mean=False)
    assert algorithms.masked_mean(kept_mean, mask).item() == pytest.approx(mean, rel=1e-5)


def test_kl_estimators():
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    assert torch.allclose(algorithms.kl_per_token(logprobs, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    k3 = algorithms.kl_per_token(logprobs, ref, "k3")
    expected = [math.exp(r - l) - 1 - (r - l) for l, r in zip(logprobs.tolist(), ref.tolist())]
    assert torch.allclose(k3, torch.tensor(expected))
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        algorithms.kl_per_token(logprobs, ref, "k2")


def test_gae_matches_a_plain_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    gamma, lam = 0.9, 0.8
    got = algorithms.compute_gae(rewards, values, gamma, lam)
    for row in range(3):
        advantage = 0.0
        for t in reversed(range(7)):
            next_value = values[row, t + 1].item() if t < 6 else 0.0
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            advantage = delta + gamma * lam * advantage
            assert got[row, t].item() == pytest.approx(advantage, abs=1e-5)


def test_gae_padding_after_the_response_contributes_nothing():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0, 0.0]])
    full = algorithms.compute_gae(rewards, values, 1.0, 0.95)
    short = algorithms.compute_gae(rewards[:, :3], values[:, :3], 1.0, 0.95)
    assert torch.allclose(full[:, :3], short)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac, approxkl, ratio = algorithms.clipped_policy_loss(new, old, advantages, mask, 0.2)
    # token 1: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 2: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)
    assert ratio.item() == pytest.approx(1.0)
    assert approxkl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    # inside the clip range nothing is clipped and the loss is -A * ratio
    loss, clipfrac, _, _ = algorithms.clipped_policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1),
                                                   torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-2.2) and clipfrac.item() == 0.0


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, clipfrac = algorithms.clipped_value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    # token 1: max((1-0)^2, (0.2-0)^2) = 1; token 2: max((0-1)^2, (0-1)^2) = 1 -> 0.5 * mean = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert clipfrac.item() == pytest.approx(0.0)
    loss, clipfrac = algorithms.clipped_value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.tensor([[2.0]]),
                                            torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.8**2) and clipfrac.item() == 1.0


def test_adaptive_kl_controller_moves_towards_target():
    controller = algorithms.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(current_kl=12.0, n_episodes=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.02)
    controller.update(current_kl=0.0, n_episodes=10)
    assert controller.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_running_moments_match_all_values():
    moments = algorithms.RunningMoments()
    chunks = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])]
    for chunk in chunks:
        moments.update(chunk)
    every = torch.cat(chunks)
    assert moments.mean == pytest.approx(every.mean().item())
    assert moments.std == pytest.approx(every.std(unbiased=False).item(), rel=1e-5)


def _whiten_half(rank: int, world_size: int, port: int, values, mask, results):
    """One of two gloo processes: whiten its half of the batch with statistics summed over both."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def sum_all(tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    half = slice(rank * 2, rank * 2 + 2)
    results[rank] = algorithms.masked_whiten(values[half], mask[half], sum_all=sum_all)
    results[f"local{rank}"] = algorithms.masked_whiten(values[half], mask[half])
    dist.destroy_process_group()


def test_whitening_across_two_processes_equals_one_process_over_the_whole_batch():
    """ppo.py whitens advantages with statistics summed over processes: two processes holding half the rollout
    each must get exactly what one process holding all of it gets (per-process whitening does not)."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    values = torch.randn(4, 6) * torch.tensor([[1.0], [1.0], [5.0], [5.0]]) + torch.tensor([[0.0], [0.0], [3.0], [3.0]])
    mask = torch.ones(4, 6)
    mask[0, 4:] = mask[3, 2:] = 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    # fork, not spawn: the children need not re-import torch and transformers (seconds each on a small machine)
    mp.start_processes(_whiten_half, args=(2, port, values, mask, results), nprocs=2, start_method="fork")
    whole = algorithms.masked_whiten(values, mask)
    assert torch.allclose(torch.cat([results[0], results[1]]), whole, atol=1e-5)
    assert not torch.allclose(torch.cat([results["local0"], results["local1"]]), whole, atol=1e-2)
    # One process with no sum_all is unchanged, and the distributed form with an identity sum is the same math.
    assert torch.allclose(algorithms.masked_whiten(values, mask, sum_all=lambda t: t), whole, atol=1e-6)


@pytest.mark.parametrize("batches", [[[2.0, 2.0, 2.0, 2.0], [2.0, 2.1, 1.9, 2.0]], [[3.0], [3.5]]])
def test_normalised_scores_stay_finite_after_a_constant_batch_or_a_batch_of_one(batches):
    """Variance 0 after the first batch (a constant one, or a global batch of a single score) must not divide."""
    moments = algorithms.RunningMoments()
    for values in batches:
        values = torch.tensor(values)
        moments.update(values)
        normalised = (values - moments.mean) / moments.std
        assert torch.isfinite(normalised).all() and normalised.abs().max() <= 0.5 / algorithms.RunningMoments.STD_FLOOR
    assert moments.std >= algorithms.RunningMoments.STD_FLOOR


def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, 3 samples each
    # prompt 1: baselines (2+6)/2, (1+6)/2, (1+2)/2; prompt 2: (0+3)/2, (0+3)/2, (0+0)/2
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]
    assert algorithms.rloo_advantages(scores, 3).tolist() == pytest.approx(expected)
    assert algorithms.rloo_advantages(torch.tensor([5.0, 2.0]), 2).tolist() == pytest.approx([3.0, -3.0])
    # k/(k-1) times the distance to the group mean: each prompt's advantages sum to 0
    assert algorithms.rloo_advantages(scores, 3).view(2, 3).sum(1).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_grpo_normalises_by_the_group_or_the_batch_or_not_at_all():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    std1, std2 = math.sqrt((4 + 1 + 9) / 2), math.sqrt((1 + 1 + 4) / 2)  # unbiased, around means 3 and 1
    centred = [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]
    group = [c / (std1 + 1e-4) for c in centred[:3]] + [c / (std2 + 1e-4) for c in centred[3:]]
    assert algorithms.grpo_advantages(scores, 3, "group").tolist() == pytest.approx(group)
    mean = sum(scores.tolist()) / 6
    batch_std = math.sqrt(sum((s - mean) ** 2 for s in scores.tolist()) / 5)
    assert algorithms.grpo_advantages(scores, 3, "batch").tolist() == pytest.approx([c / (batch_std + 1e-4) for c in centred])
    assert algorithms.grpo_advantages(scores, 3, "none").tolist() == pytest.approx(centred)
    # a prompt whose samples all scored the same teaches nothing: 0, not NaN
    assert algorithms.grpo_advantages(torch.tensor([2.0, 2.0, 1.0, 3.0]), 2).tolist() == pytest.approx(
        [0.0, 0.0, -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


@pytest.mark.parametrize("kl_coef", [0.01, 1.0])
def test_grpo_keeps_kl_coef_as_the_weight_of_the_kl_penalty(kl_coef):
    """A group whose scores tie teaches nothing from the score; the KL penalty is centred in the group but not divided
    by the group's std, so its advantages scale with kl_coef (dividing it would give +-1.16 whatever kl_coef)."""
    kl_sums = torch.tensor([0.5, 1.0, 1.5, 2.0])
    advantages = algorithms.group_baseline_advantages(torch.full((4,), 3.0), -kl_coef * kl_sums, 4, "grpo")
    assert advantages.tolist() == pytest.approx([kl_coef * 0.75, kl_coef * 0.25, -kl_coef * 0.25, -kl_coef * 0.75],
                                                abs=1e-6)


def test_grpo_normalises_the_score_alone_and_adds_the_centred_penalty():
    scores, penalties = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), torch.tensor([-0.1, -0.2, 0.0, -0.3, 0.0, -0.3])
    expected = algorithms.grpo_advantages(scores, 3, "group") + (penalties.view(2, 3) -
                                                                penalties.view(2, 3).mean(1, keepdim=True)).flatten()
    assert torch.allclose(algorithms.group_baseline_advantages(scores, penalties, 3, "grpo"), expected)
    # unscaled, GRPO is the group-mean baseline of score + penalty, as before
    assert torch.allclose(algorithms.group_baseline_advantages(scores, penalties, 3, "grpo", "none"),
                          algorithms.grpo_advantages(scores + penalties, 3, "none"), atol=1e-6)


def test_rloo_folds_the_kl_penalty_into_the_reward_before_the_baseline():
    scores, penalties = torch.tensor([1.0, 2.0, 6.0, 0.0]), torch.tensor([-0.5, 0.0, -1.0, -0.25])
    assert torch.allclose(algorithms.group_baseline_advantages(scores, penalties, 2, "rloo"),
                          algorithms.rloo_advantages(scores + penalties, 2))


def test_k3_is_finite_at_padding_where_the_policy_log_prob_is_huge():
    """A pad token the policy never predicts has log-prob ~ -1e4 there; the reference's is masked to 0. Masking the
    log-ratio before the exponential keeps k3 finite, so its masked mean is too."""
    logprobs = torch.tensor([[-1.0, -2.0, -1e4]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    unmasked = algorithms.masked_mean(algorithms.kl_per_token(logprobs, ref_logprobs, "k3"), mask)
    assert not torch.isfinite(unmasked)  # what happened before the mask argument
    kl = algorithms.kl_per_token(logprobs, ref_logprobs, "k3", mask)
    assert torch.isfinite(kl).all() and kl[0, 2] == 0
    expected = [math.expm1(-0.5) + 0.5, math.expm1(1.0) - 1.0]
    assert algorithms.masked_mean(kl, mask).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
