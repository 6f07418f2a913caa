"""Step 3 of RLHF: PPO with an actor, a reference, a reward model and a critic, on accelerate + PEFT.

    python ppo.py --config recipes/demo/ppo.yaml                      # offline demo on CPU, after steps 1 and 2
    accelerate launch --config_file accelerate_config.yaml ppo.py --config recipes/opt-1.3b/ppo.yaml \
        --sft_model_path out/opt-1.3b/sft --reward_model_path out/opt-1.3b/reward

TRL 1.16 has no PPO trainer, so this file carries its own loop, written to be read top to bottom like CleanRL's
ppo.py: 1. the arguments (TRL's PPOConfig names where the concept is the same), 2. small pure helpers (the PPO
math), 3. the four models and the loss, 4. checkpoints, 5. setup, metrics and the loop (`main`: rollout, score,
advantages, update, log/save). Generation and scoring (log-probs, values, rewards) live in rollout.py, which
evaluate.py, chat.py and bench/ share.

The four roles, and why only two copies of weights are needed with LoRA:
- actor: the SFT policy plus a fresh LoRA adapter (or the whole model without --use_peft);
- reference: the actor with its adapter switched off (without LoRA: a frozen copy of the SFT policy);
- reward model: the step-2 sequence classifier, frozen, read at the last real token;
- critic: the reward model's backbone with its own LoRA adapter, and a value head initialised from the reward
  model's score head (a PEFT `modules_to_save` copy, so the reward model's own head stays untouched), read at every
  token. Switching the critic adapter off gives back the reward model exactly.
With --advantage_estimator rloo or grpo there is no critic: K samples per prompt (--num_generations) and each
sample's baseline comes from the other samples of its prompt; the reward model is then loaded on its own.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from trl import ModelConfig, get_peft_config

import common
import memory_plan
import plots
import rollout

logger = logging.getLogger("simple_rlhf.ppo")


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PPOArguments:
    """PPO options. Names follow TRL's PPOConfig wherever the concept is the same, so a TRL config carries over."""

    # models
    sft_model_path: str | None = field(default=None, metadata={"help": "The step-1 output (model or adapter folder, "
                                       "hub id or builtin:tiny-opt): the actor's starting point and the reference."})
    reward_model_path: str | None = field(default=None, metadata={"help": "The step-2 output: a sequence classifier "
                                          "with one label (model or SEQ_CLS adapter folder)."})
    critic_model_path: str | None = field(default=None, metadata={"help": "Start the critic from this sequence "
                                          "classifier instead of the reward model (then it is a separate copy)."})
    output_dir: str = field(default="out/ppo", metadata={"help": "Where checkpoints, metrics.jsonl and the final "
                            "actor (and OUTPUT_DIR/critic) go."})
    # rollout
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts are cut from the left to this many "
                                   "tokens, at a turn boundary where possible, so the final 'Assistant:' survives."})
    response_length: int = field(default=53, metadata={"help": "Most new tokens sampled per prompt."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; the same scaling is applied to "
                               "the logits when log-probs are computed in training."})
    top_k: int = field(default=0, metadata={"help": "Must stay 0 (all tokens): PPO's log-probs and KL are those of "
                       "the full distribution at --temperature; accepted for configs that set it to 0."})
    top_p: float = field(default=1.0, metadata={"help": "Must stay 1.0 (off), for the same reason as --top_k."})
    stop_token: str = field(default="eos", metadata={"help": "Generation stops at this token: 'eos' or a token string; "
                            "tokens after it become padding."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                              "response that never produced the stop token."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-x, x] (DeepSpeed-Chat: 5)."})
    normalize_scores: bool = field(default=False, metadata={"help": "Normalise scores with a running mean and std."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Prompts per generate() call and per "
                                              "scoring forward pass (default: the whole rollout batch)."})
    generation_backend: str = field(default="static", metadata={"help": "KV cache of generate(): static "
                                    "(preallocated: no copy of the growing cache per token) or dynamic "
                                    "(transformers' default, for models without a static cache)."})
    gather_for_generation: bool = field(default=True, metadata={"help": "Under ZeRO-3, gather the actor's parameters "
                                        "for generation (fast); false for models that don't fit gathered (TRL's "
                                        "ds3_gather_for_generation)."})
    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch; the rollout batch per "
                                  "device is per_device_train_batch_size * gradient_accumulation_steps * this."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per forward/backward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the KL(actor || reference) penalty per token."})
    kl_estimator: str | None = field(default=None, metadata={"help": "KL estimator: k1 (log-ratio, unbiased) or k3 "
                                     "(non-negative, lower variance). Default: k1 in the reward, k3 with "
                                     "--kl_in_loss (k1 is refused there: its gradient is 0 on average)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards --target_kl (Ziegler et al.)."})
    target_kl: float = field(default=6.0, metadata={"help": "Target KL per sequence for --adaptive_kl."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon, in episodes, of the adaptive KL controller."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus (0: off)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    # advantage estimators (see the README's "Advantage estimators")
    advantage_estimator: str = field(default="gae", metadata={"help": "gae (a critic's values, GAE), rloo (each "
                                     "sample's baseline is the mean score of the other samples of its prompt, "
                                     "Ahmadian et al. 2024) or grpo (scores normalised by their prompt group's mean "
                                     "and std, Shao et al. 2024). rloo and grpo build, train and save no critic."})
    num_generations: int | None = field(default=None, metadata={"help": "Samples per prompt, K (TRL's name; alias "
                                        "--num_samples_per_prompt): each prompt fills K consecutive rows of the "
                                        "rollout batch. Default 1; rloo and grpo need at least 2."})
    num_samples_per_prompt: int | None = field(default=None, metadata={"help": "Alias of --num_generations."})
    kl_in_loss: bool = field(default=False, metadata={"help": "Put the KL(actor || reference) in the loss, kl_coef "
                             "times its mean per token (GRPO), instead of subtracting it from the reward. Default "
                             "estimator there: k3."})
    scale_rewards: str = field(default="group", metadata={"help": "grpo: divide by the std of the prompt's group "
                               "(group), of the whole rollout batch (batch), or by nothing (none) (TRL's GRPO name)."})
    normalize_advantages: bool = field(default=False, metadata={"help": "rloo, grpo: normalise the advantages to "
                                       "mean 0 and std 1 over the rollout batch (TRL's RLOO name); GAE's advantages "
                                       "are always whitened."})
    max_kl: float | None = field(default=None, metadata={"help": "Stop the run (exit 3, last good checkpoint kept) "
                                 "when objective/kl, the KL to the reference per sequence, goes beyond this many "
                                 "nats (default: 1 per token of --response_length)."})
    # optimisation
    learning_rate: float = field(default=3e-6, metadata={"help": "Actor learning rate."})
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Critic learning rate (default: "
                                               "learning_rate)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (actor and critic)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler: linear, cosine, "
                                   "constant, constant_with_warmup, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup iterations of the schedule."})
    max_steps: int = field(default=100, metadata={"help": "PPO iterations (rollout + update) to run."})
    total_episodes: int | None = field(default=None, metadata={"help": "If set, max_steps = total_episodes / global "
                                       "rollout batch (TRL's name)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward "
                                         "pass (actor and critic): less memory, ~30% slower."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (also set by accelerate's config)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU (set automatically without a GPU)."})
    seed: int = field(default=42, metadata={"help": "Seed of sampling, shuffling and initialisation."})
    # state and reporting
    save_steps: int = field(default=50, metadata={"help": "Write a checkpoint every this many iterations."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint-N folder, or true for "
                                               "the newest complete one in output_dir."})
    report_to: str = field(default="none", metadata={"help": "accelerate trackers: tensorboard, wandb, trackio, "
                           "comma-separated, or none (metrics.jsonl is always written)."})
    sample_every: int = field(default=10, metadata={"help": "Log a few prompt/response/score samples every N steps "
                              "(0: never)."})
    num_samples: int = field(default=2, metadata={"help": "How many samples to log."})
    # DeepSpeed-Chat parity (both off by default)
    ema_decay: float | None = field(default=None, metadata={"help": "Keep an exponential moving average of the "
                                    "actor's trainable weights with this decay (DeepSpeed-Chat: 0.992), updated after "
                                    "each optimizer step and saved to OUTPUT_DIR/ema."})
    ptx_coef: float = field(default=0.0, metadata={"help": "Weight of a language-modelling loss on --ptx_dataset_name "
                            "added to the actor's PPO loss (InstructGPT's PPO-ptx; 0: off)."})
    ptx_dataset_name: str | None = field(default=None, metadata={"help": "Rows (prompt + chosen) for the PTX loss, "
                                         "in the schema of --dataset_name (default: the PPO step's own rows)."})
    ptx_batch_size: int | None = field(default=None, metadata={"help": "PTX sequences per micro-batch (default: "
                                       "per_device_train_batch_size)."})
    ptx_max_length: int | None = field(default=None, metadata={"help": "PTX sequences are cut to this many tokens "
                                       "(default: max_prompt_length + response_length)."})

    @property
    def local_rollout_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches


# ----------------------------------------------------------------------------------------------------------------
# 2. Small pure helpers (unit-tested in tests/test_ppo_helpers.py)
# ----------------------------------------------------------------------------------------------------------------
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


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from sampled tokens (http://joschu.net/blog/kl-approx.html).

    k1 = log p - log q: unbiased, can be negative per token. k3 = (r - 1) - log r with r = q / p: never negative.
    """
    log_ratio = logprobs - ref_logprobs
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


DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "hidden_dropout",
                      "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def disable_dropout(model: nn.Module) -> list[tuple]:
    """Dropout off everywhere: nn.Dropout modules (TRL's helper) and the functional dropout OPT and others apply
    from float attributes copied from the config at init, which the config and TRL's helper don't reach.
    Returns (config, name, value before) for each config value set to 0, for `dropout_config_restored`."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    changed = []
    for module in model.modules():
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        for name in DROPOUT_ATTRIBUTES:
            value = getattr(config, name, None)
            if isinstance(value, float) and value != 0.0:
                changed.append((config, name, value))
                setattr(config, name, 0.0)
    return changed


@contextlib.contextmanager
def dropout_config_restored(changed: list[tuple]):
    """The configs' own dropout values while a model is saved: PPO's switch is for training, not the model's."""
    for config, name, value in changed:
        setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, _ in changed:
            setattr(config, name, 0.0)


WEIGHT_GROWTH_LIMIT = 100.0  # see divergence


def divergence(metrics: dict, max_kl: float, weights_at_start: dict) -> str | None:
    """What shows that training has blown up, or None. A run that goes on from there only wrecks the model while
    exiting 0, so main stops it (exit 3) and keeps the last good checkpoint. Three signs:
    - any metric not finite (NaN or inf: scores, KL, losses, gradient norm, weights);
    - |objective/kl| beyond max_kl nats per sequence (default 1 per response token: the sampled tokens are then on
      average e times likelier under the policy than under the reference it should stay close to);
    - the RMS of the trainable weights of the actor or critic (weights/*_rms) over WEIGHT_GROWTH_LIMIT times what it
      was at the start: an optimizer step of lr 1e6 moves every weight by about 1e6, a sane one barely moves it.
    """
    bad = [name for name, value in metrics.items() if isinstance(value, (int, float)) and not math.isfinite(value)]
    if bad:
        return f"non-finite {', '.join(bad)}"
    kl = metrics["objective/kl"]
    if abs(kl) > max_kl:
        return f"objective/kl {kl:.4g} is beyond --max_kl {max_kl:g} (nats per sequence)"
    for name, start in weights_at_start.items():
        if metrics[name] > WEIGHT_GROWTH_LIMIT * max(start, 1e-3):
            return f"{name} {metrics[name]:.4g} grew over {WEIGHT_GROWTH_LIMIT:g}x its {start:.4g} at the start"
    return None


# ----------------------------------------------------------------------------------------------------------------
# 3. The four models
# ----------------------------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    """Actor and critic in one module, so one accelerate/DeepSpeed engine, one optimizer (two learning rates) and
    one backward pass serve both. The frozen reference and reward model live inside them (adapters off). critic
    None: a critic-free estimator (rloo, grpo), the actor alone."""

    def __init__(self, actor, critic):
        super().__init__()
        self.actor, self.critic = actor, critic

    def forward(self, input_ids, attention_mask, ptx_ids=None, ptx_mask=None, logits_to_keep: int = 0):
        """Policy logits (at the last logits_to_keep positions; 0: all) and values of a rollout micro-batch, plus the
        policy's logits on a PTX batch if given: one forward through the (DDP/DeepSpeed-wrapped) module, so one
        backward covers all three."""
        ptx_logits = None if ptx_ids is None else rollout.policy_logits(self.actor, ptx_ids, ptx_mask)
        values = None if self.critic is None else rollout.per_token_scores(self.critic, input_ids, attention_mask)
        return rollout.policy_logits(self.actor, input_ids, attention_mask, keep=logits_to_keep), values, ptx_logits


def micro_batch_loss(model, batch: dict, args, context: int, ptx: tuple | None = None, kl_coef: float = 0.0,
                     advantages_of=None):
    """The loss of one micro-batch: clipped policy loss + vf_coef * clipped value loss (with a critic)
    - entropy_coef * entropy (+ kl_coef * mean KL to the reference per token with --kl_in_loss, from
    batch["ref_logprobs"]) (+ ptx_coef * LM loss on the PTX batch `ptx` = (ids, mask)); returns (loss, stats).
    A batch without "advantages" is a single-pass update (see one_pass_update): advantages_of(values) gives the
    advantages and returns from the values of this very forward pass."""
    ptx_ids, ptx_mask = ptx if ptx is not None else (None, None)
    # Position t predicts token t+1: the logits and values for the response are those at context-1 .. end-1, so
    # the vocabulary head runs on those positions only.
    logits, new_values, ptx_logits = model(batch["input_ids"], batch["attention_mask"], ptx_ids, ptx_mask,
                                           batch["responses"].shape[1] + 1)
    logits = logits[:, :-1]
    new_logprobs = rollout.logprobs_from_logits(logits, batch["responses"], args.temperature)
    mask = batch["mask"]
    if new_values is not None:
        new_values = new_values[:, context - 1:-1]
    if "advantages" not in batch:  # the weights have not moved since the rollout: these are the rollout's values
        values = new_values.detach() * mask
        advantages, returns = advantages_of(values)
        batch = {**batch, "values": values, "advantages": advantages, "returns": returns}
    pg_loss, clipfrac, approxkl, ratio = clipped_policy_loss(new_logprobs, batch["logprobs"], batch["advantages"],
                                                             mask, args.cliprange)
    loss = pg_loss
    stats = dict(approxkl=approxkl, clipfrac=clipfrac, pg_loss=pg_loss, ratio=ratio)
    if new_values is not None:
        vf_loss, vf_clipfrac = clipped_value_loss(new_values, batch["values"], batch["returns"], mask,
                                                  args.cliprange_value)
        loss = loss + args.vf_coef * vf_loss
        stats.update(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac)
    if args.kl_in_loss:  # GRPO: the KL as a loss term, its gradient through the new log-probs
        stats["kl_loss"] = masked_mean(kl_per_token(new_logprobs, batch["ref_logprobs"], args.kl_estimator), mask)
        loss = loss + kl_coef * stats["kl_loss"]
    with torch.set_grad_enabled(args.entropy_coef != 0 and torch.is_grad_enabled()):
        stats["entropy"] = masked_mean(rollout.entropy_from_logits(logits, args.temperature), mask)
    if args.entropy_coef:
        loss = loss - args.entropy_coef * stats["entropy"]
    if ptx_logits is not None:
        # InstructGPT's PPO-ptx: keep the policy a good language model of the SFT/pretraining data, against the
        # "alignment tax" RL would otherwise take on it.
        stats["ptx_loss"] = lm_loss(ptx_logits, ptx_ids, ptx_mask)
        loss = loss + args.ptx_coef * stats["ptx_loss"]
    return loss, stats


def keep_4bit_weights_trainable(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster inference kernel the
    first time it runs in eval mode (our rollout) and never packs them back; that kernel has no backward, so the
    next training forward fails ("a view of a leaf Variable ... in-place operation"). PPO alternates the two
    modes, so keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_models(args: PPOArguments, model_args: ModelConfig, tokenizer, reward_tokenizer, paths: dict):
    """Load the SFT policy, reward model and critic; return (actor_critic, reference or None, reward or None).

    reference None means "the actor with its adapter off"; reward None means "the critic with its adapter off".
    A critic-free estimator (rloo, grpo) builds no critic: actor_critic.critic is None, the reward model stands alone.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    actor = common.load_model(model_args, AutoModelForCausalLM, paths["sft"], "--sft_model_path")
    reward = common.load_model(model_args, AutoModelForSequenceClassification, paths["reward"], "--reward_model_path",
                               num_labels=1)
    reward.config.pad_token_id = reward_tokenizer.pad_token_id
    if args.advantage_estimator != "gae":
        critic = None
    elif paths["critic"] is not None:
        critic = common.load_model(model_args, AutoModelForSequenceClassification, paths["critic"],
                                   "--critic_model_path", num_labels=1)
    elif not rollout.same_tokenizer(tokenizer, reward_tokenizer):
        # Values must line up with the actor's tokens, so the critic cannot read the reward model's tokens.
        critic = common.load_model(model_args, AutoModelForSequenceClassification, paths["sft"], "--sft_model_path",
                                   num_labels=1)
    elif model_args.use_peft:
        critic = reward  # shared: the reward model is the critic with its adapter off
    else:
        critic = copy.deepcopy(reward)
    shared = critic is reward
    if quantized:
        for model in {id(m): m for m in (actor, reward, critic) if m is not None}.values():
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
            keep_4bit_weights_trainable(model)
    reference = None
    if not model_args.use_peft:
        reference = copy.deepcopy(actor).eval().requires_grad_(False)
    reward.requires_grad_(False)

    if model_args.use_peft:
        actor = get_peft_model(actor, get_peft_config(replace(model_args, lora_task_type="CAUSAL_LM")))
        # SEQ_CLS puts the score head in modules_to_save: the critic trains a copy of it as its value head, and
        # with the adapter off the untouched original gives the reward model's score.
        if critic is not None:
            critic = get_peft_model(critic, get_peft_config(replace(model_args, lora_task_type="SEQ_CLS")))
    if args.gradient_checkpointing:
        for model in (m for m in (actor, critic) if m is not None):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    changed = []
    for model in (actor, critic, reward, reference):
        if model is not None:
            changed += disable_dropout(model)  # after PEFT, which adds its own lora_dropout modules
    actor_critic = ActorCritic(actor, critic)
    actor_critic.dropout_changes = changed  # put back in the configs while saving (dropout_config_restored)
    return actor_critic, reference, (None if shared else reward)


# 4. Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def zero3_gathered(accelerator, params, modifier_rank=None):
    """Under ZeRO-3 each process holds a shard of every parameter (and none at all of a 0-size placeholder):
    gather full values for reading (saving) or, with modifier_rank, for writing (loading). Every process must
    enter it. A no-op without ZeRO-3."""
    import contextlib

    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def trainable_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module, cpu: bool = True) -> dict:
    return {name: (p.detach().cpu() if cpu else p.detach()).clone() for name, p in model.named_parameters()
            if p.requires_grad}


@torch.no_grad()
def weight_metrics(accelerator, unwrapped: nn.Module) -> dict:
    """{"weights/actor_rms", "weights/critic_rms"}: the root mean square of each role's trainable weights, over
    every process's shard under ZeRO-3 (every process must call it)."""
    out = {}
    for role in ("actor", "critic"):
        module = getattr(unwrapped, role, None)
        params = trainable_parameters(module) if module is not None else []
        if not params:
            continue
        sharded = any(hasattr(p, "ds_tensor") for p in params)
        local = [p.ds_tensor if sharded else p for p in params]
        squares = torch.nn.utils.get_total_norm([t.detach() for t in local]).float() ** 2  # no float32 copies
        if sharded:
            squares = accelerator.reduce(squares.to(accelerator.device), "sum")
        count = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        out[f"weights/{role}_rms"] = math.sqrt(squares.item() / max(count, 1))
    return out


def check_weights_finite(accelerator, unwrapped: nn.Module, what: str) -> None:
    """Refuse to save `what` when the trainable weights hold NaN or inf (the same answer on every process)."""
    bad = [name for name, value in weight_metrics(accelerator, unwrapped).items() if not math.isfinite(value)]
    if bad:
        raise TrainingDiverged(f"non-finite {', '.join(bad)}: {what} not written")


@torch.no_grad()
def save_with_weights(model: nn.Module, weights: dict, path) -> None:
    """Save `model` (an adapter or a full model) with `weights` swapped in for its trainable ones (the EMA)."""
    current = trainable_state(model, cpu=False)
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value.to(params[name].dtype))
    try:
        model.save_pretrained(path)
    finally:
        for name, value in current.items():
            params[name].copy_(value)


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, args, tokenizer, ema=None) -> str:
    """Write output_dir/checkpoint-N via a temporary folder renamed when complete; prune this run's checkpoints to
    save_total_limit. Weights that are not finite are never written as a complete checkpoint."""
    output_dir = Path(args.output_dir)
    check_weights_finite(accelerator, accelerator.unwrap_model(model), f"checkpoint-{state['step']}")
    final = output_dir / f"checkpoint-{state['step']}"
    partial = output_dir / f".partial-checkpoint-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "DEEPSPEED":
        model.save_checkpoint(str(partial / "deepspeed"), exclude_frozen_parameters=True)
    torch.save(rng_state(), partial / f"rng_state_{accelerator.process_index}.pth")
    with zero3_gathered(accelerator, trainable_parameters(unwrapped)):
        if accelerator.is_main_process:
            torch.save(trainable_state(unwrapped), partial / "trainable_params.pt")
            if accelerator.distributed_type != "DEEPSPEED":
                torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
            with dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                unwrapped.actor.save_pretrained(partial / "actor")
                if unwrapped.critic is not None:
                    unwrapped.critic.save_pretrained(partial / "critic")
            tokenizer.save_pretrained(partial / "actor")
            if ema is not None:
                torch.save({k: v.cpu() for k, v in ema.items()}, partial / "ema.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        common.mark_checkpoint_complete(partial, step=state["step"], run_id=state["run_id"], saved_at=time.time())
        os.replace(partial, final)
        if args.save_total_limit:
            for old in checkpoints_to_prune(output_dir, state["run_id"], args.save_total_limit):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


def new_run_id() -> str:
    """Names a run in its checkpoints, so that pruning never deletes another run's (a resumed run keeps its id)."""
    import uuid

    return uuid.uuid4().hex[:12]


def checkpoints_to_prune(output_dir: Path, run_id: str, keep: int) -> list[Path]:
    """This run's complete checkpoints but the `keep` newest written (by time, not step number: after a resume
    from an older checkpoint, the one just written is the newest even if larger step numbers exist)."""
    mine = []
    for folder in output_dir.glob("checkpoint-*"):
        marker = folder / common.CHECKPOINT_COMPLETE
        info = json.loads(marker.read_text()) if marker.exists() else {}
        if info.get("run_id") == run_id:
            mine.append((info.get("saved_at", 0.0), folder))
    return [folder for _, folder in sorted(mine)[:-keep]]


def load_checkpoint(path: str, accelerator, model, optimizer, scheduler, args, ema=None) -> dict:
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    for flag, default in (("advantage_estimator", "gae"), ("num_generations", 1)):
        if state.get(flag, default) != getattr(args, flag):
            raise common.UserError(f"--resume_from_checkpoint {path}: it was written with --{flag} "
                                   f"{state.get(flag, default)}, not {getattr(args, flag)}; resume with the same")
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "DEEPSPEED":
        model.load_checkpoint(str(path / "deepspeed"), load_module_strict=False, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    saved = torch.load(path / "trainable_params.pt")
    missing = set(trainable_state(unwrapped)) - set(saved)
    if missing:
        raise common.UserError(f"--resume_from_checkpoint {path}: it lacks {len(missing)} trainable tensors (e.g. "
                               f"{sorted(missing)[0]}); it was written with other model flags")
    with torch.no_grad(), zero3_gathered(accelerator, trainable_parameters(unwrapped), modifier_rank=0):
        for name, param in unwrapped.named_parameters():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    if ema is not None:
        if not (path / "ema.pt").exists():
            raise common.UserError(f"--resume_from_checkpoint {path}: it has no EMA (ema.pt); it was written without "
                                   "--ema_decay")
        for name, value in torch.load(path / "ema.pt").items():
            ema[name].copy_(value)
    rng_file = path / f"rng_state_{accelerator.process_index}.pth"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_final(accelerator, model, args, data_args, model_args, tokenizer, paths, ema=None) -> None:
    """The actor (adapter or full) + tokenizer in output_dir, the critic (if any) in output_dir/critic, the EMA actor
    in output_dir/ema, optionally merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unwrapped = accelerator.unwrap_model(model)
    check_weights_finite(accelerator, unwrapped, "the final model")
    staging = Path(args.output_dir) / ".saving"
    with zero3_gathered(accelerator, trainable_parameters(unwrapped)):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            with dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                unwrapped.actor.save_pretrained(staging)
                if unwrapped.critic is not None:
                    unwrapped.critic.save_pretrained(staging / "critic")
            tokenizer.save_pretrained(staging)
    if ema is not None:
        with zero3_gathered(accelerator, trainable_parameters(unwrapped.actor), modifier_rank=0):
            if accelerator.is_main_process:
                with dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                    save_with_weights(unwrapped.actor, ema, staging / "ema")
                tokenizer.save_pretrained(staging / "ema")
    if accelerator.is_main_process:
        if data_args.merge_adapter and model_args.use_peft:
            # Reload the SFT policy in full precision on the CPU: merging into a 4-bit base would lose precision.
            full = replace(model_args, load_in_4bit=False, load_in_8bit=False, dtype="float32")
            base = common.load_model(full, AutoModelForCausalLM, paths["sft"], "--sft_model_path")
            PeftModel.from_pretrained(base, str(staging)).merge_and_unload().save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
        elif data_args.merge_adapter:
            logger.warning("--merge_adapter: the actor has no adapter (full fine-tuning); nothing to merge")
        common.move_into(staging, args.output_dir)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# 5. Setup, metrics and the loop
# ----------------------------------------------------------------------------------------------------------------
class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, writes a checkpoint and exits 0."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Give the caller (a test, the bench) its own handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        logger.warning(f"received {signal.Signals(signum).name}: finishing this step, then checkpoint and exit")
        self.requested = True


def validate(args: PPOArguments, model_args: ModelConfig) -> dict:
    """Every check that needs no model weights, before anything is loaded or written."""
    common.check_model_flags(model_args)
    validate_estimator(args)
    if args.generation_backend not in rollout.GENERATION_BACKENDS:
        raise common.UserError(f"--generation_backend {args.generation_backend}: use one of "
                               f"{', '.join(rollout.GENERATION_BACKENDS)}")
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                 "response_length", "max_prompt_length", "save_steps"):
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.local_rollout_batch_size % args.num_generations:
        raise common.UserError(f"--num_generations {args.num_generations} does not divide the rollout batch per "
                               f"device ({args.local_rollout_batch_size} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches): each prompt's samples must be on "
                               "one device")
    if args.generation_batch_size is None:
        args.generation_batch_size = args.local_rollout_batch_size
    if args.generation_batch_size < 1:
        raise common.UserError(f"--generation_batch_size {args.generation_batch_size}: must be at least 1")
    if args.local_rollout_batch_size % args.generation_batch_size:
        raise common.UserError(f"--generation_batch_size {args.generation_batch_size} does not divide the rollout "
                               f"batch per device ({args.local_rollout_batch_size} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches); pick a divisor")
    if args.temperature <= 0:
        raise common.UserError(f"--temperature {args.temperature}: must be positive (PPO needs sampling)")
    if args.top_k != 0 or args.top_p != 1.0:
        # Truncated sampling would make every rollout off-policy for log-probs of the full distribution, and the
        # truncated reference gives probability 0 (an infinite KL) to tokens outside its own top-k / top-p. TRL's
        # PPO trainer sampled with top_k 0 and top_p 1.0 for the same reason.
        flag = f"--top_k {args.top_k}" if args.top_k != 0 else f"--top_p {args.top_p}"
        raise common.UserError(f"{flag}: PPO samples from the full distribution at --temperature (its log-probs and "
                               "KL are that distribution's); leave --top_k 0 and --top_p 1.0, and lower "
                               "--temperature for less random answers")
    if args.max_kl is None:
        args.max_kl = float(args.response_length)  # 1 nat per token: see divergence()
    if args.critic_learning_rate is None and args.advantage_estimator == "gae":
        args.critic_learning_rate = args.learning_rate
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise common.UserError(f"--ema_decay {args.ema_decay}: must be in [0, 1) (DeepSpeed-Chat uses 0.992)")
    if args.ptx_coef < 0:
        raise common.UserError(f"--ptx_coef {args.ptx_coef}: must be non-negative")
    args.ptx_batch_size = args.ptx_batch_size or args.per_device_train_batch_size
    args.ptx_max_length = args.ptx_max_length or args.max_prompt_length + args.response_length
    paths = {"sft": common.resolve_model_path(args.sft_model_path, "--sft_model_path"),
             "reward": common.resolve_model_path(args.reward_model_path, "--reward_model_path"),
             "critic": (common.resolve_model_path(args.critic_model_path, "--critic_model_path")
                        if args.critic_model_path else None)}
    common.require_causal_lm(paths["sft"], "--sft_model_path")  # a reward model here would train silently
    for key, flag in (("reward", "--reward_model_path"), ("critic", "--critic_model_path")):
        if paths[key] is not None:
            rollout.check_reward_model(paths[key], flag)
    return paths


def validate_estimator(args: PPOArguments) -> None:
    """The advantage estimator and the options that go with it; fills in num_generations and kl_estimator."""
    estimator = args.advantage_estimator
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise common.UserError(f"--advantage_estimator {estimator}: use one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if None not in (args.num_generations, args.num_samples_per_prompt) and \
            args.num_generations != args.num_samples_per_prompt:
        raise common.UserError(f"--num_generations {args.num_generations} and --num_samples_per_prompt "
                               f"{args.num_samples_per_prompt}: the same option under two names; give one")
    args.num_generations = args.num_samples_per_prompt = args.num_generations or args.num_samples_per_prompt or 1
    if estimator != "gae" and args.num_generations < 2:
        raise common.UserError(f"--advantage_estimator {estimator} needs --num_generations (alias "
                               "--num_samples_per_prompt) of at least 2: its baseline is the other samples of "
                               "the same prompt")
    if args.scale_rewards not in SCALE_REWARDS:
        raise common.UserError(f"--scale_rewards {args.scale_rewards}: use one of {', '.join(SCALE_REWARDS)}")
    only = {"--scale_rewards": ("grpo",) if args.scale_rewards != "group" else None,
            "--normalize_advantages": ("rloo", "grpo") if args.normalize_advantages else None,
            "--critic_model_path": ("gae",) if args.critic_model_path else None,
            "--whiten_rewards": ("gae",) if args.whiten_rewards else None}
    for flag, estimators in only.items():
        if estimators is not None and estimator not in estimators:
            raise common.UserError(f"{flag} applies to --advantage_estimator {' or '.join(estimators)} only, not "
                                   f"{estimator}")
    if estimator != "gae" and args.critic_learning_rate is not None:  # e.g. from a GAE recipe: harmless
        logger.warning(f"--critic_learning_rate is not used: --advantage_estimator {estimator} has no critic")
    if args.kl_estimator is None:
        args.kl_estimator = "k3" if args.kl_in_loss else "k1"
    if args.kl_estimator not in ("k1", "k3"):
        raise common.UserError(f"--kl_estimator {args.kl_estimator}: use k1 or k3")
    if args.kl_in_loss and args.kl_estimator == "k1":
        raise common.UserError("--kl_estimator k1 with --kl_in_loss: the gradient of k1 is 0 on average, so the "
                               "term would not pull towards the reference; use k3 (GRPO's)")


def load_ptx_data(data_args, args: PPOArguments, tokenizer):
    """The PTX rows, tokenized as step 1 does (prompt + chosen + EOS), cut to ptx_max_length: by default the PPO
    step's own share of --dataset_name, with their chosen answers; with --ptx_dataset_name, all its training rows.
    The LM loss covers every real token, prompt included, as InstructGPT's pretraining mix does."""
    ptx_data_args = replace(data_args, dataset_name=args.ptx_dataset_name or data_args.dataset_name,
                            data_split="1,0,0", max_train_samples=None)
    rows, _ = common.load_step_data(ptx_data_args, "sft")  # all training rows, with prompt and chosen
    if args.ptx_dataset_name is None:  # the same rows as the PPO prompts: step 3's share of --data_split
        rows = rows.select(common.split_indices(len(rows), data_args.data_split, "ppo", data_args.data_seed_for_split))
    if data_args.max_train_samples is not None:
        rows = rows.select(range(min(len(rows), data_args.max_train_samples)))
    encoded, counts = common.tokenize_for_step(rows, tokenizer, "sft", args.ptx_max_length)
    if len(encoded) < args.ptx_batch_size * int(os.environ.get("WORLD_SIZE", 1)):
        raise common.UserError(f"--ptx_dataset_name {ptx_data_args.dataset_name}: {len(encoded)} usable rows (of "
                               f"{counts['rows']}) are fewer than one PTX batch; lower --ptx_batch_size or raise "
                               "--ptx_max_length")
    logger.info(f"PTX: {len(encoded)} rows of {ptx_data_args.dataset_name}, loss weight {args.ptx_coef}")
    return encoded


def check_prompts_fit(data_args, tokenizer, max_prompt_length: int) -> None:
    """Prompts are cut from the left at turn boundaries; one whose last turn alone does not fit loses the start of
    the question. Refuse when that is every prompt (the limit is wrong), warn when it is some."""
    rows, _ = common.load_step_data(data_args, "ppo")
    last_turns = [prompt[max(prompt.rfind("\n\nHuman:"), 0):] for prompt in rows["prompt"]]
    budget = max_prompt_length - len(common.special_prefix(tokenizer))
    lengths = [len(ids) for ids in tokenizer(last_turns, add_special_tokens=False)["input_ids"]]
    too_long = sum(n > budget for n in lengths)
    if too_long == len(lengths):
        raise common.UserError(f"--max_prompt_length {max_prompt_length}: the last turn of every prompt is longer "
                               f"(the shortest is {min(lengths) + max_prompt_length - budget} tokens); raise it")
    if too_long:
        logger.warning(f"{too_long} of {len(lengths)} prompts have a last turn longer than --max_prompt_length "
                       f"{max_prompt_length}; they are cut inside that turn")




def make_accelerator(args: PPOArguments):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # accelerate launch exports the DeepSpeed config's "auto" here; the PPO arguments decide, as in TRL's trainers.
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") == "auto":
        del os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
    # use_cpu (set automatically without a GPU) makes torchrun's processes one MULTI_CPU group, but cpu=True would
    # also silently turn an `accelerate launch` DeepSpeed config into plain MULTI_CPU: DeepSpeed keeps its own.
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(cpu=args.use_cpu and not deepspeed_launch, mixed_precision="bf16" if args.bf16 else None,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=None if args.report_to == "none" else args.report_to.split(","),
                              project_dir=args.output_dir)
    common.setup_logging(accelerator.is_main_process)
    common.log_distribution(accelerator)
    set_seed(args.seed)
    return accelerator


def stop_token_id_of(tokenizer, stop_token: str) -> int:
    if stop_token == "eos":
        return tokenizer.eos_token_id
    stop_ids = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    if len(stop_ids) != 1:
        raise common.UserError(f"--stop_token {stop_token!r} is {len(stop_ids)} tokens; give one token or eos")
    return stop_ids[0]


@dataclass
class Setup:
    """What main() builds before the loop: tokenizer, data, models, optimizer, and the rollout's settings."""

    accelerator: object
    tokenizer: object
    generation_config: object  # transformers.GenerationConfig: what the rollout samples
    logprobs_temperature: float | None  # record the rollout's log-probs while sampling (float32), or None
    model: nn.Module  # the ActorCritic, wrapped by accelerate (DDP / DeepSpeed engine)
    unwrapped: ActorCritic
    reference: nn.Module | None  # None: the actor with its adapter off
    reward_fn: object  # rollout.reward_function: a Rollout -> its scores
    optimizer: object
    scheduler: object
    global_batch: int  # rollouts per iteration over all processes
    prompt_batch: object  # step -> this process's prompts (lists of ids)
    ptx_batch: object  # position -> this process's PTX sequences, or None without --ptx_coef


def setup(data_args, args: PPOArguments, model_args: ModelConfig, paths: dict, accelerator) -> Setup:
    from transformers import get_scheduler

    tokenizer = common.load_tokenizer(paths["sft"], padding_side="left")
    reward_tokenizer = common.load_tokenizer(paths["reward"], padding_side="left")
    same_tokenizer = rollout.same_tokenizer(tokenizer, reward_tokenizer)
    if accelerator.is_main_process:
        memory_plan.log_estimate("ppo", args, model_args, same_tokenizer)
    stop_token_id = stop_token_id_of(tokenizer, args.stop_token)
    with accelerator.main_process_first():
        check_prompts_fit(data_args, tokenizer, args.max_prompt_length)
        train, _ = common.prepare_step_data(data_args, tokenizer, "ppo", args.max_prompt_length, args.max_prompt_length)
    global_batch = args.local_rollout_batch_size * accelerator.num_processes
    if len(train) < global_batch // args.num_generations:
        raise common.UserError(f"{len(train)} PPO prompts are fewer than one rollout batch needs "
                               f"({global_batch // args.num_generations} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches * processes / num_generations); use "
                               "more data or smaller batches")
    if args.total_episodes is not None:
        args.max_steps = max(1, args.total_episodes // global_batch)
    if not same_tokenizer and args.critic_model_path is None:
        logger.info("the reward model has its own tokenizer: texts are re-tokenized for scoring" +
                    (", and the critic starts from the SFT policy's backbone with a fresh value head"
                     if args.advantage_estimator == "gae" else ""))

    model, reference, reward = build_models(args, model_args, tokenizer, reward_tokenizer, paths)
    groups = [{"params": trainable_parameters(model.actor), "lr": args.learning_rate}]
    if model.critic is not None:
        groups.append({"params": trainable_parameters(model.critic), "lr": args.critic_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, eps=1e-5)
    if accelerator.state.deepspeed_plugin is not None:
        # There is no dataloader for accelerate to read the micro-batch size from.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        ds_config["gradient_clipping"] = args.max_grad_norm
    model, optimizer = accelerator.prepare(model, optimizer)
    # Stepped once per PPO iteration, by hand: accelerate would step it once per process.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    # DeepSpeed's bf16 casts its engine's model (actor and critic) to bf16: the frozen copies follow, or the KL would
    # compare bf16 with float32 log-probs and not be 0 at the first step. Quantized weights keep their own types.
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    dtype = next(p.dtype for p in accelerator.unwrap_model(model).actor.parameters() if p.is_floating_point())
    for frozen in (reference, reward):
        if frozen is not None:
            frozen.to(accelerator.device, **({} if quantized else {"dtype": dtype}))
    unwrapped = accelerator.unwrap_model(model)
    # reward None: the reward model is the critic with its adapter off.
    reward_fn = rollout.reward_function(unwrapped.critic if reward is None else reward, tokenizer, reward_tokenizer,
                                        adapter_off=reward is None)
    generation_config = rollout.sampling_config(args.response_length, args.temperature, args.top_k, args.top_p,
                                                stop_token_id, tokenizer.pad_token_id,
                                                backend=args.generation_backend)
    # generate()'s logits are those of a fresh forward pass (to ~1e-6) only in float32 without autocast: there the
    # rollout's log-probs are recorded while sampling, one forward pass fewer; otherwise (bf16, 4-bit) recomputed.
    exact = accelerator.mixed_precision == "no" and all(p.dtype == torch.float32 for p in unwrapped.actor.parameters())

    # Token ids as plain lists, read once: the loop picks rows from them every iteration. Each batch is a pure
    # function of its position, so a resumed run sees the same data.
    prompt_ids = train["input_ids"]
    ptx_ids = load_ptx_data(data_args, args, tokenizer)["input_ids"] if args.ptx_coef else None
    n, rank = accelerator.num_processes, accelerator.process_index

    def prompt_batch(step: int) -> list[list[int]]:
        """Each prompt num_generations times in a row: K independent samples, in consecutive rows (a group)."""
        k = args.num_generations
        prompts = rollout.shard_of_shuffle(prompt_ids, args.local_rollout_batch_size // k, step, args.seed, n, rank)
        return [ids for ids in prompts for _ in range(k)]

    def ptx_batch(position: int) -> list[list[int]]:
        return rollout.shard_of_shuffle(ptx_ids, args.ptx_batch_size, position, args.seed + 7919, n, rank)

    return Setup(accelerator, tokenizer, generation_config, args.temperature if exact else None, model, unwrapped,
                 reference, reward_fn, optimizer, scheduler, global_batch, prompt_batch,
                 ptx_batch if args.ptx_coef else None)


def initial_ema(accelerator, unwrapped: ActorCritic, decay: float | None) -> dict | None:
    """The EMA starts from the actor's initial weights (as DeepSpeed-Chat's copy of the actor does), in float32."""
    if decay is None:
        return None
    with zero3_gathered(accelerator, trainable_parameters(unwrapped.actor)):
        return {k: v.float() for k, v in trainable_state(unwrapped.actor, cpu=False).items()}


def start_metrics_file(accelerator, args: PPOArguments, step: int, resumed: bool) -> Path:
    """OUTPUT_DIR/metrics.jsonl, without the lines of steps after the checkpoint we resume from (to be redone)."""
    metrics_file = Path(args.output_dir) / "metrics.jsonl"
    if accelerator.is_main_process:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_file.read_text().splitlines() if metrics_file.exists() and resumed else [])
                if json.loads(line)["step"] <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    if args.report_to != "none":
        accelerator.init_trackers("ppo", config={k: v for k, v in asdict(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    return metrics_file


def shape_scores(scores: torch.Tensor, has_stop: torch.Tensor, args: PPOArguments, moments: RunningMoments,
                 accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's scores with the missing-EOS penalty and clipping (logged as objective/scores), and the
    same normalised by the running moments if --normalize_scores (what the reward uses)."""
    if args.missing_eos_penalty is not None:
        scores = scores - args.missing_eos_penalty * (~has_stop).float()
    if args.score_clip is not None:
        scores = scores.clamp(-args.score_clip, args.score_clip)
    if not args.normalize_scores:
        return scores, scores
    moments.update(accelerator.gather(scores))
    return scores, (scores - moments.mean) / moments.std


def advantages_and_returns(non_score_reward, scores, values, response_mask, args: PPOArguments, accelerator):
    """Per-token rewards (the KL penalty, plus the score at the last response token), then GAE; advantages are
    whitened. Whitening statistics span all processes' rollouts, so N processes do the math of one with N batches.
    Critic-free estimators (values None): see group_advantages; returns None."""
    mask = response_mask.float()
    if args.advantage_estimator != "gae":
        return group_advantages(scores + non_score_reward.sum(1), args, accelerator)[:, None] * mask, None
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), rollout.last_token_index(response_mask)] += scores
    sum_all = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, sum_all=sum_all)
    advantages = compute_gae(rewards, values, args.gamma, args.lam) * mask
    returns = advantages + values
    return masked_whiten(advantages, mask, sum_all=sum_all), returns


def group_advantages(rewards: torch.Tensor, args: PPOArguments, accelerator) -> torch.Tensor:
    """One advantage per sequence from its reward (the score, minus kl_coef * its KL unless --kl_in_loss, as TRL's
    RLOO): RLOO's or GRPO's baseline within each prompt's group, computed on all processes' rewards gathered (so
    batch statistics are global), then this process's share; --normalize_advantages: to mean 0, std 1 over all."""
    everyone = accelerator.gather(rewards) if accelerator.num_processes > 1 else rewards
    if args.advantage_estimator == "rloo":
        advantages = rloo_advantages(everyone, args.num_generations)
    else:
        advantages = grpo_advantages(everyone, args.num_generations, args.scale_rewards)
    if args.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    start = accelerator.process_index * len(rewards)
    return advantages[start:start + len(rewards)]


def one_pass_update(args: PPOArguments) -> bool:
    """Whether the update is one forward and backward pass over the whole rollout, before any optimizer step (GAE,
    1 PPO epoch, 1 mini-batch, 1 micro-batch per process). Then the critic's values at that forward are those of
    the rollout (the weights have not moved, dropout is off), so the scoring phase skips the critic's forward pass
    and GAE runs between the update's forward and its backward: one critic forward pass fewer per iteration."""
    return (args.advantage_estimator == "gae" and args.num_ppo_epochs == 1 and args.num_mini_batches == 1
            and args.gradient_accumulation_steps == 1)


def rows_of(advantages_of, idx: torch.Tensor):
    """advantages_of for a micro-batch holding rows idx (a permutation of the whole rollout) of the batch."""
    def of_rows(values: torch.Tensor):
        in_order = torch.empty_like(values)
        in_order[idx] = values
        advantages, returns = advantages_of(in_order)
        return advantages[idx], returns[idx]
    return of_rows


def ppo_update(run: Setup, batch: dict, args: PPOArguments, context: int, ema: dict | None, ptx_position: int,
               kl_coef: float = 0.0, advantages_of=None):
    """num_ppo_epochs passes over the rollout batch, num_mini_batches optimizer steps each (in micro-batches of
    per_device_train_batch_size); kl_coef weighs the KL loss term of --kl_in_loss; advantages_of: the single-pass
    update's GAE of the values (one_pass_update). Returns (lists of per-micro-batch stats, the new PTX position)."""
    accelerator, model, optimizer, actor = run.accelerator, run.model, run.optimizer, run.unwrapped.actor
    stats = {}
    mini_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
    for _ in range(args.num_ppo_epochs):
        order = torch.randperm(args.local_rollout_batch_size)
        for mini in rollout.chunks(args.local_rollout_batch_size, mini_size):
            for micro in rollout.chunks(mini.stop - mini.start, args.per_device_train_batch_size):
                idx = order[mini][micro].to(accelerator.device)
                ptx = None
                if run.ptx_batch is not None:
                    ptx = rollout.left_pad(run.ptx_batch(ptx_position), run.tokenizer.pad_token_id, accelerator.device)
                    ptx_position += 1
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, micro_stats = micro_batch_loss(model, {k: v[idx] for k, v in batch.items()}, args, context,
                                                         ptx, kl_coef, advantages_of and rows_of(advantages_of, idx))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # The norm before clipping (under DeepSpeed: the previous step's, or None before one)
                        norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        if norm is not None:
                            stats.setdefault("grad_norm", []).append(torch.as_tensor(norm, dtype=torch.float32))
                    optimizer.step()
                    optimizer.zero_grad()
                if ema is not None and accelerator.sync_gradients:  # after each real optimizer step
                    with zero3_gathered(accelerator, trainable_parameters(actor)):
                        ema_update(ema, trainable_state(actor, cpu=False), args.ema_decay)
                for key, value in micro_stats.items():
                    stats.setdefault(key, []).append(value.detach().float())
    return stats, ptx_position


def iteration_metrics(accelerator, stats: dict, kl, logprobs, non_score_reward, scores, shaped, sample,
                      stop_token_id: int) -> dict:
    """This iteration's rollout and update statistics, averaged over processes (counts summed)."""
    mean = lambda values: torch.stack(values).mean()  # noqa: E731
    local = {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": (shaped + non_score_reward.sum(1)).mean(),
        "objective/scores": scores.mean(),
        "policy/approxkl_avg": mean(stats["approxkl"]),
        "policy/clipfrac_avg": mean(stats["clipfrac"]),
        "loss/policy_avg": mean(stats["pg_loss"]),
        "policy/entropy_avg": mean(stats["entropy"]),
        "val/ratio": mean(stats["ratio"]),
        "val/ratio_var": torch.stack(stats["ratio"]).var() if len(stats["ratio"]) > 1 else torch.tensor(0.0),
        "val/num_eos_tokens": ((sample.responses == stop_token_id) & sample.response_mask.bool()).sum().float(),
        "response_length_avg": sample.response_mask.sum(1).float().mean(),
    }
    for name, key in (("loss/value_avg", "vf_loss"), ("val/clipfrac_avg", "vf_clipfrac"), ("loss/kl_avg", "kl_loss"),
                      ("loss/ptx_avg", "ptx_loss")):  # with a critic; with --kl_in_loss; with --ptx_coef
        if key in stats:
            local[name] = mean(stats[key])
    if "grad_norm" in stats:  # the largest of the iteration's optimizer steps, before clipping
        local["grad_norm_max"] = torch.stack([n.cpu() for n in stats["grad_norm"]]).max()
    names = list(local)
    reduced = accelerator.reduce(torch.stack([local[n].to(accelerator.device).float() for n in names]), "mean")
    metrics = dict(zip(names, reduced.tolist()))
    metrics["val/num_eos_tokens"] *= accelerator.num_processes  # a count: summed over processes
    return metrics


def log_samples(tokenizer, sample, raw_scores, step: int, count: int) -> None:
    for i in range(min(count, len(sample))):
        prompt = tokenizer.decode(sample.queries[i][sample.query_mask[i].bool()], skip_special_tokens=True)
        answer = tokenizer.decode(sample.responses[i][sample.response_mask[i].bool()], skip_special_tokens=True)
        logger.info(f"sample at step {step} (score {raw_scores[i].item():.3f}):\n...{prompt[-200:]!s}\n>>> {answer}")


class TrainingDiverged(Exception):
    """The run blew up (see divergence): one line on stderr, exit code 3, the last good checkpoint kept."""


@common.exit_on_user_error
def main(data_args: common.DataArguments, args: PPOArguments, model_args: ModelConfig) -> list[dict]:
    """Run PPO (see train); whatever way it ends, give back the signal handlers and end the trackers."""
    from accelerate import PartialState

    with contextlib.ExitStack() as cleanup:
        try:
            return train(data_args, args, model_args, cleanup)
        except TrainingDiverged as error:
            cleanup.close()  # first: the progress bar ends its line, so that the error has one of its own
            if PartialState().is_main_process:
                print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(3)


def train(data_args: common.DataArguments, args: PPOArguments, model_args: ModelConfig,
          cleanup: contextlib.ExitStack) -> list[dict]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    paths = validate(args, model_args)
    common.check_output_dir(args.output_dir, data_args.overwrite_output_dir, args.resume_from_checkpoint)
    accelerator = make_accelerator(args)
    resume = common.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    run = setup(data_args, args, model_args, paths, accelerator)
    # Every process built the same models from --seed; from here each samples from its own stream (TRL's
    # local_seed), else N processes would draw the same random numbers. Process 0 keeps the single-process stream.
    if accelerator.process_index > 0:
        set_seed(args.seed + accelerator.process_index * 100003)
    if data_args.overwrite_output_dir:  # last, once data and models loaded: a mistake above leaves the old run
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                common.set_previous_run_aside(args.output_dir)
    model, unwrapped, optimizer, scheduler = run.model, run.unwrapped, run.optimizer, run.scheduler
    kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    score_moments = RunningMoments()
    ema = initial_ema(accelerator, unwrapped, args.ema_decay)
    step, ptx_position = 0, 0  # ptx_position: PTX micro-batches consumed so far (the same count on every process)
    if resume:
        state = load_checkpoint(resume, accelerator, model, optimizer, scheduler, args, ema)
        step, ptx_position = state["step"], state.get("ptx_position", 0)
        if args.adaptive_kl:  # the controller's state; without it, --kl_coef as given now
            kl_controller.value = state["kl_coef"]
        score_moments.__dict__.update(state["score_moments"])
        run_id = state.get("run_id") or new_run_id()
        logger.info(f"resumed from {resume} at step {step}")
    else:
        run_id = new_run_id()  # read on the main process only, which writes the checkpoints
    if step >= args.max_steps:
        logger.info(f"already at step {step} of --max_steps {args.max_steps}")
    metrics_file = start_metrics_file(accelerator, args, step, bool(resume))
    cleanup.callback(accelerator.end_training)
    weights_at_start = weight_metrics(accelerator, unwrapped)

    device, stop_token_id = accelerator.device, run.generation_config.eos_token_id
    stop = StopRequested()
    cleanup.callback(stop.restore)
    history, last_checkpoint = [], resume
    one_pass = one_pass_update(args)  # then the critic's values come from the update's forward pass, not scoring
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="PPO")
    cleanup.callback(progress.close)
    while step < args.max_steps:
        started = time.perf_counter()
        # --- 1. rollout: the current policy answers this step's prompts ------------------------------------------
        queries, query_mask = rollout.left_pad(run.prompt_batch(step), run.tokenizer.pad_token_id, device)
        unwrapped.eval()
        with gathered_for_generation(model, accelerator, args.gather_for_generation):
            sample = rollout.generate_rollout(unwrapped.actor, queries, query_mask, run.generation_config,
                                              args.generation_batch_size, run.logprobs_temperature)
        generated = time.perf_counter()

        # --- 2. score: log-probs under actor and reference, the critic's values (if any), the reward model's scores
        scored = rollout.score_rollout(sample, unwrapped.actor, run.reference, None if one_pass else unwrapped.critic,
                                       run.reward_fn, args.temperature, args.generation_batch_size,
                                       accelerator.autocast)
        scores, shaped = shape_scores(scored["scores"], sample.has_stop, args, score_moments, accelerator)

        # --- 3. advantages: a KL penalty per token (unless --kl_in_loss), the score at the last one, then GAE;
        #        or, critic-free, one advantage per sequence from the other samples of its prompt (rloo, grpo) --
        mask = sample.response_mask.float()
        logprobs, ref_logprobs, values = (None if scored[k] is None else scored[k] * mask
                                          for k in ("logprobs", "ref_logprobs", "values"))
        kl = kl_per_token(logprobs, ref_logprobs, args.kl_estimator) * mask
        non_score_reward = torch.zeros_like(kl) if args.kl_in_loss else -kl_controller.value * kl
        def advantages_of(values):
            return advantages_and_returns(non_score_reward, shaped, values, sample.response_mask, args, accelerator)

        advantages, returns = (None, None) if one_pass else advantages_of(values)
        scored_at = time.perf_counter()

        # --- 4. update: clipped policy and value losses, num_ppo_epochs passes over the rollout -------------------
        unwrapped.train()
        batch = dict(input_ids=sample.input_ids, attention_mask=sample.attention_mask, responses=sample.responses,
                     logprobs=logprobs, values=values, advantages=advantages, returns=returns, mask=mask,
                     ref_logprobs=ref_logprobs if args.kl_in_loss else None)
        batch = {k: v for k, v in batch.items() if v is not None}  # no values or returns without a critic
        stats, ptx_position = ppo_update(run, batch, args, sample.context, ema, ptx_position, kl_controller.value,
                                         advantages_of if one_pass else None)
        learning_rates = scheduler.get_last_lr()  # the rates this iteration used, for the metrics
        scheduler.step()
        step += 1
        if args.adaptive_kl:
            kl_controller.update(accelerator.reduce(kl.sum(1).mean(), "mean").item(), run.global_batch)
        updated = time.perf_counter()

        # --- 5. log and save --------------------------------------------------------------------------------------
        metrics = {"step": step, "episode": step * run.global_batch,
                   **iteration_metrics(accelerator, stats, kl, logprobs, non_score_reward, scores, shaped, sample,
                                       stop_token_id),
                   "lr": learning_rates[0], **({"critic_lr": learning_rates[1]} if len(learning_rates) > 1 else {}),
                   "objective/kl_coef": kl_controller.value,
                   "time/generation_s": generated - started, "time/scoring_s": scored_at - generated,
                   "time/update_s": updated - scored_at, "memory/peak_gb": peak_memory_gb()}
        metrics["tokens_per_s"] = metrics["response_length_avg"] * run.global_batch / (updated - started)
        metrics.update(weight_metrics(accelerator, unwrapped))
        problem = divergence(metrics, args.max_kl, weights_at_start)
        if problem:
            raise TrainingDiverged(f"training diverged at step {step}: {problem} (lower --learning_rate, set "
                                   f"--score_clip, or check the reward model); the last good checkpoint is "
                                   f"{last_checkpoint or 'none'} and was left untouched")
        history.append(metrics)
        if accelerator.is_main_process:
            with metrics_file.open("a") as out:
                out.write(json.dumps(metrics) + "\n")
        accelerator.log(metrics, step=step)
        progress.update(1)
        progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
            log_samples(run.tokenizer, sample, scored["scores"], step, args.num_samples)
        stop_now = accelerator.reduce(torch.tensor(float(stop.requested), device=device), "sum").item() > 0
        if step % args.save_steps == 0 or stop_now:
            state = {"step": step, "kl_coef": kl_controller.value, "score_moments": vars(score_moments),
                     "data_position": step * run.global_batch, "ptx_position": ptx_position,
                     "max_steps": args.max_steps, "run_id": run_id,
                     "advantage_estimator": args.advantage_estimator, "num_generations": args.num_generations}
            last_checkpoint = save_checkpoint(accelerator, model, optimizer, scheduler, state, args, run.tokenizer,
                                              ema)
        if stop_now:
            accelerator.print(f"stopped at step {step} on request; resume with --resume_from_checkpoint "
                              f"{last_checkpoint}")
            return history
    progress.close()

    save_final(accelerator, model, args, data_args, model_args, run.tokenizer, paths, ema)
    if accelerator.is_main_process:
        common.drop_previous_run(args.output_dir)  # the final model is complete: an overwritten run may go now
        plots.plot_ppo(args.output_dir)  # OUTPUT_DIR/ppo_curves.png from metrics.jsonl
        logged = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        if logged:  # from the run's first step, also after a resume
            print(f"PPO done: mean score {logged[0]['objective/scores']:.3f} -> "
                  f"{logged[-1]['objective/scores']:.3f}, KL {logged[-1]['objective/kl']:.3f}, "
                  f"actor in {args.output_dir}", flush=True)
    return history


def gathered_for_generation(model, accelerator, gather: bool):
    """Under ZeRO-3 the actor's parameters are sharded: gather them once for the whole generate() call (otherwise
    every new token would gather every layer). A no-op for other setups, or with --gather_for_generation false."""
    if not gather:
        return contextlib.nullcontext()
    return zero3_gathered(accelerator, accelerator.unwrap_model(model).actor.parameters())


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


if __name__ == "__main__":
    main(*common.parse_args((common.DataArguments, PPOArguments, ModelConfig)))
