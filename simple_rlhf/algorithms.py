"""The RL maths as pure tensor functions, each naming its paper.

KL estimators, GAE, the RLOO and GRPO baselines, PPO's clipped losses, whitening, running moments.
"""

from __future__ import annotations

import math

import numpy as np
import torch

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_all=None) -> torch.Tensor:
    """Zero mean (unless shift_mean is false: then the mean is kept), unit variance over the masked entries.

    sum_all sums a tensor over processes (e.g. `lambda t: accelerator.reduce(t, "sum")`): then mean and variance
    are those of the whole global batch, so N processes whiten exactly as one process with all N batches would.
    """
    if sum_all is None:
        mean, variance = masked_mean(values, mask), masked_var(values, mask)
    else:
        # Two passes (sum and count, then squared deviations): steadier in float32 than sum of squares - mean^2.
        total, count = sum_all(torch.stack([(values * mask).sum(), mask.sum()]).float()).unbind()
        mean = total / count.clamp(min=1)
        squares = sum_all(((values - mean) ** 2 * mask).sum().float())
        variance = squares / (count - 1).clamp(min=1)  # unbiased, as masked_var
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1",
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from sampled tokens (http://joschu.net/blog/kl-approx.html).

    k1 = log p - log q: unbiased, can be negative per token. k3 = (r - 1) - log r with r = q / p: never negative.
    mask: 0 at padding, where the log-ratio is set to 0 before the exponential of k3 (a padding position can hold a
    policy log-prob of a token it never predicts, e.g. -1e4, and exp(1e4) = inf, inf * 0 = NaN in a masked mean).
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates, backwards over the response; padding must hold 0 rewards and values."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo")


SCALE_REWARDS = ("group", "batch", "none")


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's reward minus the mean reward of the other k-1
    samples of its prompt. rewards: (n * k,), each prompt's k samples consecutive."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def grpo_advantages(rewards: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's reward minus its prompt group's mean, divided by the group's std
    (scale "group"), the whole batch's (scale "batch", Liu et al. 2025) or not at all ("none"); stds unbiased, eps
    as TRL's. rewards: (n * k,), each prompt's k samples consecutive."""
    grouped = rewards.view(-1, k)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    std = grouped.std(1, keepdim=True) if scale == "group" else rewards.std()
    return (centred / (std + eps)).flatten()


def group_baseline_advantages(scores: torch.Tensor, penalties: torch.Tensor, k: int, estimator: str,
                              scale: str = "group") -> torch.Tensor:
    """Critic-free advantages of sequences whose reward is score + penalty (penalty = -kl_coef * KL, or 0).

    RLOO (Ahmadian et al. 2024, as TRL's RLOO): the leave-one-out baseline of the whole reward. GRPO (Shao et al.
    2024): the score is normalised within its group (grpo_advantages, `scale`), and the penalty only centred in the
    group, not divided by the group's score std: dividing it would make the KL weight kl_coef / std, different for
    every prompt, and in a group whose scores tie kl_coef would cancel and the advantages push on the KL alone. Both
    are linear in the penalty, so with scale "none" GRPO is exactly the mean-baseline of score + penalty."""
    if estimator == "rloo":
        return rloo_advantages(scores + penalties, k)
    return grpo_advantages(scores, k, scale) + grpo_advantages(penalties, k, "none")


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate; returns (loss, clip fraction, approx KL, mean ratio)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl, masked_mean(ratio, mask)


def clipped_value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Value loss with the prediction kept within cliprange_value of the rollout's; returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses, losses_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    return loss, masked_mean((losses_clipped > losses).float(), mask)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens: the PTX (pretraining-mix) loss."""
    from trl.trainer.utils import selective_log_softmax

    logprobs = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
    # A target counts when it and the token predicting it are real (not the first real token after left padding).
    return -masked_mean(logprobs, (attention_mask[:, :-1] * attention_mask[:, 1:]).float())


def ema_update(ema: dict, weights: dict, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place, in float32 (DeepSpeed-Chat's moving_average)."""
    for name, value in weights.items():
        ema[name].mul_(decay).add_(value.detach().to(ema[name].device, torch.float32), alpha=1 - decay)


class AdaptiveKLController:
    """Ziegler et al. 2019: move kl_coef so that the KL per sequence tracks a target (proportional control)."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_episodes / self.horizon


class RunningMoments:
    """Running mean and std of scores over all rollouts so far (Chan et al. parallel update). The std is floored at
    STD_FLOOR: a constant first batch, or a global batch of one score, has variance 0, and dividing by it would turn
    the next small difference into an enormous reward."""

    STD_FLOOR = 1e-2

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, values: torch.Tensor) -> None:
        batch_mean, batch_var, n = values.mean().item(), values.var(unbiased=False).item(), values.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), self.STD_FLOOR) if self.count > 1 else 1.0
