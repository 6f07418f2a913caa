"""One PPO iteration's update: advantages (GAE, RLOO, GRPO), the micro-batch loss, optimizer steps, metrics."""

from __future__ import annotations

import logging

import torch

from simple_rlhf import actor_critic, algorithms, rollout
from simple_rlhf.errors import UserError

logger = logging.getLogger("simple_rlhf")


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
    pg_loss, clipfrac, approxkl, ratio = algorithms.clipped_policy_loss(new_logprobs, batch["logprobs"],
                                                                        batch["advantages"], mask, args.cliprange)
    loss = pg_loss
    stats = dict(approxkl=approxkl, clipfrac=clipfrac, pg_loss=pg_loss, ratio=ratio)
    if new_values is not None:
        vf_loss, vf_clipfrac = algorithms.clipped_value_loss(new_values, batch["values"], batch["returns"], mask,
                                                             args.cliprange_value)
        loss = loss + args.vf_coef * vf_loss
        stats.update(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac)
    if args.kl_in_loss:  # GRPO: the KL as a loss term, its gradient through the new log-probs
        kl = algorithms.kl_per_token(new_logprobs, batch["ref_logprobs"], args.kl_estimator, mask)
        stats["kl_loss"] = algorithms.masked_mean(kl, mask)
        loss = loss + kl_coef * stats["kl_loss"]
    with torch.set_grad_enabled(args.entropy_coef != 0 and torch.is_grad_enabled()):
        stats["entropy"] = algorithms.masked_mean(rollout.entropy_from_logits(logits, args.temperature), mask)
    if args.entropy_coef:
        loss = loss - args.entropy_coef * stats["entropy"]
    if ptx_logits is not None:
        # InstructGPT's PPO-ptx: keep the policy a good language model of the SFT/pretraining data, against the
        # "alignment tax" RL would otherwise take on it.
        stats["ptx_loss"] = algorithms.lm_loss(ptx_logits, ptx_ids, ptx_mask)
        loss = loss + args.ptx_coef * stats["ptx_loss"]
    return loss, stats


def shape_scores(scores: torch.Tensor, has_stop: torch.Tensor, args, moments: algorithms.RunningMoments,
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


def advantages_and_returns(non_score_reward, scores, values, response_mask, args, accelerator):
    """Per-token rewards (the KL penalty, plus the score at the last response token), then GAE; advantages are
    whitened. Whitening statistics span all processes' rollouts, so N processes do the math of one with N batches.
    Critic-free estimators (values None): see group_advantages; returns None."""
    mask = response_mask.float()
    if args.advantage_estimator != "gae":
        return group_advantages(scores, non_score_reward.sum(1), args, accelerator)[:, None] * mask, None
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), rollout.last_token_index(response_mask)] += scores
    sum_all = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    if args.whiten_rewards:
        rewards = algorithms.masked_whiten(rewards, mask, shift_mean=False, sum_all=sum_all)
    advantages = algorithms.compute_gae(rewards, values, args.gamma, args.lam) * mask
    returns = advantages + values
    return algorithms.masked_whiten(advantages, mask, sum_all=sum_all), returns


def group_advantages(scores: torch.Tensor, penalties: torch.Tensor, args, accelerator) -> torch.Tensor:
    """One advantage per sequence from its score and its KL penalty (-kl_coef * its KL; 0 with --kl_in_loss), with
    RLOO's or GRPO's baseline within each prompt's group (algorithms.group_baseline_advantages), computed on all
    processes' sequences gathered (so batch statistics are global), then this process's share;
    --normalize_advantages: to mean 0, std 1 over all."""
    everyone = torch.stack([scores, penalties])
    everyone = accelerator.gather(everyone.T).T if accelerator.num_processes > 1 else everyone
    advantages = algorithms.group_baseline_advantages(everyone[0], everyone[1], args.num_generations,
                                                      args.advantage_estimator, args.scale_rewards)
    if args.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    start = accelerator.process_index * len(scores)
    return advantages[start:start + len(scores)]


def one_pass_update(args) -> bool:
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


def ppo_update(run, batch: dict, args, context: int, ema: dict | None, ptx_position: int,
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
                    with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(actor)):
                        algorithms.ema_update(ema, actor_critic.trainable_state(actor, cpu=False), args.ema_decay)
                for key, value in micro_stats.items():
                    stats.setdefault(key, []).append(value.detach().float())
    return stats, ptx_position


def iteration_metrics(accelerator, stats: dict, kl, logprobs, non_score_reward, scores, shaped, sample,
                      stop_token_id: int, sources: dict | None = None) -> dict:
    """This iteration's rollout and update statistics, averaged over processes (counts summed); `sources`:
    {rewards/NAME: (sum, count)} of each reward source, averaged over the samples it applied to."""
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
    if sources:
        totals = accelerator.reduce(torch.stack(list(sources.values())).to(accelerator.device), "sum").tolist()
        metrics.update({name: total / max(count, 1) for name, (total, count) in zip(sources, totals)})
    return metrics


def log_samples(tokenizer, sample, raw_scores, step: int, count: int) -> None:
    for i in range(min(count, len(sample))):
        prompt = tokenizer.decode(sample.queries[i][sample.query_mask[i].bool()], skip_special_tokens=True)
        answer = tokenizer.decode(sample.responses[i][sample.response_mask[i].bool()], skip_special_tokens=True)
        logger.info(f"sample at step {step} (score {raw_scores[i].item():.3f}):\n...{prompt[-200:]!s}\n>>> {answer}")


def validate_estimator(args) -> None:
    """ppo.py's advantage estimator and the options that go with it, before anything is loaded (UserError: one line,
    exit 2); fills in num_generations and kl_estimator."""
    estimator = args.advantage_estimator
    if estimator not in algorithms.ADVANTAGE_ESTIMATORS:
        raise UserError(f"--advantage_estimator {estimator}: use one of {', '.join(algorithms.ADVANTAGE_ESTIMATORS)}")
    if None not in (args.num_generations, args.num_samples_per_prompt) and \
            args.num_generations != args.num_samples_per_prompt:
        raise UserError(f"--num_generations {args.num_generations} and --num_samples_per_prompt "
                               f"{args.num_samples_per_prompt}: the same option under two names; give one")
    args.num_generations = args.num_samples_per_prompt = args.num_generations or args.num_samples_per_prompt or 1
    if estimator != "gae" and args.num_generations < 2:
        raise UserError(f"--advantage_estimator {estimator} needs --num_generations (alias "
                               "--num_samples_per_prompt) of at least 2: its baseline is the other samples of "
                               "the same prompt")
    if args.scale_rewards not in algorithms.SCALE_REWARDS:
        raise UserError(f"--scale_rewards {args.scale_rewards}: use one of {', '.join(algorithms.SCALE_REWARDS)}")
    only = {"--scale_rewards": ("grpo",) if args.scale_rewards != "group" else None,
            "--normalize_advantages": ("rloo", "grpo") if args.normalize_advantages else None,
            "--critic_model_path": ("gae",) if args.critic_model_path else None,
            "--whiten_rewards": ("gae",) if args.whiten_rewards else None}
    for flag, estimators in only.items():
        if estimators is not None and estimator not in estimators:
            raise UserError(f"{flag} applies to --advantage_estimator {' or '.join(estimators)} only, not "
                                   f"{estimator}")
    if estimator != "gae" and args.critic_learning_rate is not None:  # e.g. from a GAE recipe: harmless
        logger.warning(f"--critic_learning_rate is not used: --advantage_estimator {estimator} has no critic")
    if args.kl_estimator is None:
        args.kl_estimator = "k3" if args.kl_in_loss else "k1"
    if args.kl_estimator not in ("k1", "k3"):
        raise UserError(f"--kl_estimator {args.kl_estimator}: use k1 or k3")
    if args.kl_in_loss and args.kl_estimator == "k1":
        raise UserError("--kl_estimator k1 with --kl_in_loss: the gradient of k1 is 0 on average, so the "
                               "term would not pull towards the reference; use k3 (GRPO's)")
