"""Step 3 of RLHF: PPO with an actor, a reference, a reward model and a critic, on accelerate + PEFT.

    python ppo.py --config recipes/demo/ppo.yaml                      # offline demo on CPU, after steps 1 and 2
    accelerate launch --config_file accelerate_config.yaml ppo.py --config recipes/opt-1.3b/ppo.yaml \
        --sft_model_path out/opt-1.3b/sft --reward_model_path out/opt-1.3b/reward

TRL 1.16 has no PPO trainer, so this file carries its own loop, written to be read top to bottom like CleanRL's
ppo.py: 1. the arguments (TRL's PPOConfig names where the concept is the same), 2. validation before anything
loads, 3. setup (data, models, optimizer), 4. the loop in numbered phases (rollout, score, advantages, update,
log/save). The pieces live in the package: the maths in simple_rlhf/algorithms.py (each formula with its paper),
the models in actor_critic.py, generation and scoring in rollout.py, the update and its loss in update.py,
checkpoints in checkpoints.py, the divergence guard in health.py.

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
import json
import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from trl import ModelConfig

from simple_rlhf.errors import UserError, exit_on_user_error
from simple_rlhf import (actor_critic, algorithms, arguments, checkpoints, data, health, memory_plan, models, plots,
                         rewards, rollout, runs, update)

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
                                          "with one label (model or SEQ_CLS adapter folder); `none` for reward "
                                          "functions alone (--reward_funcs)."})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Reward functions beside (or instead of) "
                                           "the reward model: module:function, path/to/file.py:function or "
                                           "builtin:synthetic; each fn(prompts, completions, **columns) -> "
                                           "list[float | None], as TRL's GRPOTrainer calls them."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward source, the "
                                               "reward model first (default 1 each); 0 logs a source (e.g. a ground "
                                               "truth) without optimising it."})
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
    kl_budget: float = field(default=0.0, metadata={"help": "End the run normally (final policy saved, exit 0) "
                             "once objective/kl, the KL to the reference per sequence averaged over the last 3 "
                             "iterations, reaches this many nats: a budget against over-optimising a learned reward "
                             "model, whose true reward peaks at some KL and falls after it (Gao et al. 2022). 0: off."})
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


ARGUMENTS = (data.DataArguments, PPOArguments, ModelConfig)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


# ----------------------------------------------------------------------------------------------------------------
# 2. Validation: every check that needs no weights, before anything is loaded or written
# ----------------------------------------------------------------------------------------------------------------
def validate(args: PPOArguments, model_args: ModelConfig) -> tuple[dict, list]:
    """Every check that needs no model weights, before anything is loaded or written; returns the models' paths and
    the loaded reward functions."""
    models.check_model_flags(model_args)
    if str(args.reward_model_path).lower() == "none":  # overrides a recipe's reward model: reward functions alone
        args.reward_model_path = None
    reward_functions = [rewards.load_reward_function(spec) for spec in args.reward_funcs or []]
    args.reward_weights = rewards.check_weights(args.reward_weights, rewards.source_names(
        args.reward_model_path is not None, reward_functions))
    update.validate_estimator(args)
    if args.generation_backend not in rollout.GENERATION_BACKENDS:
        raise UserError(f"--generation_backend {args.generation_backend}: use one of "
                               f"{', '.join(rollout.GENERATION_BACKENDS)}")
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                 "response_length", "max_prompt_length", "save_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.local_rollout_batch_size % args.num_generations:
        raise UserError(f"--num_generations {args.num_generations} does not divide the rollout batch per "
                               f"device ({args.local_rollout_batch_size} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches): each prompt's samples must be on "
                               "one device")
    if args.generation_batch_size is None:
        args.generation_batch_size = args.local_rollout_batch_size
    if args.generation_batch_size < 1:
        raise UserError(f"--generation_batch_size {args.generation_batch_size}: must be at least 1")
    if args.local_rollout_batch_size % args.generation_batch_size:
        raise UserError(f"--generation_batch_size {args.generation_batch_size} does not divide the rollout "
                               f"batch per device ({args.local_rollout_batch_size} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches); pick a divisor")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be positive (PPO needs sampling)")
    if args.top_k != 0 or args.top_p != 1.0:
        # Truncated sampling would make every rollout off-policy for log-probs of the full distribution, and the
        # truncated reference gives probability 0 (an infinite KL) to tokens outside its own top-k / top-p. TRL's
        # PPO trainer sampled with top_k 0 and top_p 1.0 for the same reason.
        flag = f"--top_k {args.top_k}" if args.top_k != 0 else f"--top_p {args.top_p}"
        raise UserError(f"{flag}: PPO samples from the full distribution at --temperature (its log-probs and "
                               "KL are that distribution's); leave --top_k 0 and --top_p 1.0, and lower "
                               "--temperature for less random answers")
    if args.max_kl is None:
        args.max_kl = float(args.response_length)  # 1 nat per token: see divergence()
    if args.critic_learning_rate is None and args.advantage_estimator == "gae":
        args.critic_learning_rate = args.learning_rate
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay {args.ema_decay}: must be in [0, 1) (DeepSpeed-Chat uses 0.992)")
    if args.ptx_coef < 0:
        raise UserError(f"--ptx_coef {args.ptx_coef}: must be non-negative")
    args.ptx_batch_size = args.ptx_batch_size or args.per_device_train_batch_size
    args.ptx_max_length = args.ptx_max_length or args.max_prompt_length + args.response_length
    paths = {"sft": models.resolve_model_path(args.sft_model_path, "--sft_model_path"),
             "reward": (models.resolve_model_path(args.reward_model_path, "--reward_model_path")
                        if args.reward_model_path else None),
             "critic": (models.resolve_model_path(args.critic_model_path, "--critic_model_path")
                        if args.critic_model_path else None)}
    models.require_causal_lm(paths["sft"], "--sft_model_path")  # a reward model here would train silently
    models.check_lora_targets(model_args, paths["sft"], "--sft_model_path")  # the actor's adapter, before loading
    for key, flag in (("reward", "--reward_model_path"), ("critic", "--critic_model_path")):
        if paths[key] is not None:
            models.check_reward_model(paths[key], flag)
    return paths, reward_functions


# ----------------------------------------------------------------------------------------------------------------
# 3. Setup: accelerator, tokenizer, data, models, optimizer
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What main() builds before the loop: tokenizer, data, models, optimizer, and the rollout's settings."""

    accelerator: object
    tokenizer: object
    generation_config: object  # transformers.GenerationConfig: what the rollout samples
    logprobs_temperature: float | None  # record the rollout's log-probs while sampling (float32), or None
    model: nn.Module  # the ActorCritic, wrapped by accelerate (DDP / DeepSpeed engine)
    unwrapped: actor_critic.ActorCritic
    reference: nn.Module | None  # None: the actor with its adapter off
    reward_fn: object  # rollout.reward_function: a Rollout -> the reward model's scores; None without one
    reward_functions: list  # rewards.RewardFunction: --reward_funcs
    reward_sources: list[str]  # names in the metrics (rewards/NAME): the reward model ("model") first
    optimizer: object
    scheduler: object
    global_batch: int  # rollouts per iteration over all processes
    prompt_batch: object  # step -> this process's prompts (lists of ids) and their dataset rows
    ptx_batch: object  # position -> this process's PTX sequences, or None without --ptx_coef


def setup(data_args, args: PPOArguments, model_args: ModelConfig, paths: dict, reward_functions: list,
          accelerator) -> Setup:
    from transformers import get_scheduler

    tokenizer = models.load_tokenizer(paths["sft"], padding_side="left")
    # Without a reward model (reward functions alone) the critic, if any, reads the policy's own tokens.
    reward_tokenizer = models.load_tokenizer(paths["reward"], padding_side="left") if paths["reward"] else tokenizer
    for loaded, flag in ((tokenizer, "--sft_model_path"), (reward_tokenizer, "--reward_model_path")):
        if loaded.eos_token_id is None:  # answers end in EOS: sft.py and reward.py trained on answer + EOS
            raise UserError(f"{flag} {loaded.name_or_path}: its tokenizer has no EOS token, which ends every answer "
                            "in training and in sampling; set eos_token in its tokenizer_config.json")
    same_tokenizer = rollout.same_tokenizer(tokenizer, reward_tokenizer)
    if accelerator.is_main_process:
        memory_plan.log_estimate("ppo", args, model_args, same_tokenizer)
    stop_token_id = rollout.stop_token_id(tokenizer, args.stop_token)
    with accelerator.main_process_first():
        data.check_prompts_fit(data_args, tokenizer, args.max_prompt_length)
        train, _ = data.prepare_step_data(data_args, tokenizer, "ppo", args.max_prompt_length, args.max_prompt_length)
    rewards.check_columns(reward_functions, train.column_names, data_args.dataset_name)
    global_batch = args.local_rollout_batch_size * accelerator.num_processes
    if len(train) < global_batch // args.num_generations:
        raise UserError(f"{len(train)} PPO prompts are fewer than one rollout batch needs "
                               f"({global_batch // args.num_generations} = per_device_train_batch_size * "
                               "gradient_accumulation_steps * num_mini_batches * processes / num_generations); use "
                               "more data or smaller batches")
    if args.total_episodes is not None:
        args.max_steps = max(1, args.total_episodes // global_batch)
    if paths["reward"] is None and args.advantage_estimator == "gae" and args.critic_model_path is None:
        logger.info("no reward model: the critic starts from the SFT policy's backbone with a fresh value head")
    elif not same_tokenizer and args.critic_model_path is None:
        logger.info("the reward model has its own tokenizer: texts are re-tokenized for scoring" +
                    (", and the critic starts from the SFT policy's backbone with a fresh value head"
                     if args.advantage_estimator == "gae" else ""))

    model, reference, reward = actor_critic.build_models(args, model_args, tokenizer, reward_tokenizer, paths)
    groups = [{"params": actor_critic.trainable_parameters(model.actor), "lr": args.learning_rate}]
    if model.critic is not None:
        groups.append({"params": actor_critic.trainable_parameters(model.critic), "lr": args.critic_learning_rate})
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
    if accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3:
        # Built partitioned (deepspeed.zero.Init), the frozen models need DeepSpeed to gather their shards.
        reference, reward = (actor_critic.prepare_frozen(m, accelerator) for m in (reference, reward))
    else:
        for frozen in (reference, reward):
            if frozen is not None:
                frozen.to(accelerator.device, **({} if quantized else {"dtype": dtype}))
    unwrapped = accelerator.unwrap_model(model)
    # reward None: the reward model is the critic with its adapter off (or there is none: reward functions alone).
    reward_fn = None if paths["reward"] is None else rollout.reward_function(
        unwrapped.critic if reward is None else reward, tokenizer, reward_tokenizer, adapter_off=reward is None,
        stop_token_id=stop_token_id)
    generation_config = rollout.sampling_config(args.response_length, args.temperature, args.top_k, args.top_p,
                                                stop_token_id, tokenizer.pad_token_id,
                                                backend=args.generation_backend)
    # generate()'s logits are those of a fresh forward pass (to ~1e-6) only in float32 without autocast: there the
    # rollout's log-probs are recorded while sampling, one forward pass fewer; otherwise (bf16, 4-bit) recomputed.
    exact = accelerator.mixed_precision == "no" and all(p.dtype == torch.float32 for p in unwrapped.actor.parameters())

    # Token ids as plain lists, read once: the loop picks rows from them every iteration. Each batch is a pure
    # function of its position, so a resumed run sees the same data.
    prompt_ids = train["input_ids"]
    prompt_rows = train.remove_columns("input_ids").to_list()  # what reward functions read: prompt and columns
    ptx_ids = data.load_ptx_data(data_args, args, tokenizer)["input_ids"] if args.ptx_coef else None
    n, rank = accelerator.num_processes, accelerator.process_index

    def prompt_batch(step: int) -> tuple[list[list[int]], list[dict]]:
        """Each prompt num_generations times in a row: K independent samples, in consecutive rows (a group)."""
        k = args.num_generations
        picked = rollout.shard_of_shuffle(range(len(prompt_ids)), args.local_rollout_batch_size // k, step,
                                          args.seed, n, rank)
        return [prompt_ids[i] for i in picked for _ in range(k)], [prompt_rows[i] for i in picked for _ in range(k)]

    def ptx_batch(position: int) -> list[list[int]]:
        return rollout.shard_of_shuffle(ptx_ids, args.ptx_batch_size, position, args.seed + 7919, n, rank)

    return Setup(accelerator, tokenizer, generation_config, args.temperature if exact else None, model, unwrapped,
                 reference, reward_fn, reward_functions,
                 rewards.source_names(reward_fn is not None, reward_functions), optimizer, scheduler, global_batch,
                 prompt_batch,
                 ptx_batch if args.ptx_coef else None)


# ----------------------------------------------------------------------------------------------------------------
# 4. The loop: rollout, score, advantages, update, log and save
# ----------------------------------------------------------------------------------------------------------------
@exit_on_user_error
def main(data_args: data.DataArguments, args: PPOArguments, model_args: ModelConfig) -> list[dict]:
    """Run PPO (see train); whatever way it ends, give back the signal handlers and end the trackers."""
    from accelerate import PartialState

    with contextlib.ExitStack() as cleanup:
        try:
            return train(data_args, args, model_args, cleanup)
        except health.RunStopped as error:  # diverged (exit 3), a checkpoint or the final model not written (4)
            cleanup.close()  # first: the progress bar ends its line, so that the error has one of its own
            if PartialState().is_main_process:
                print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)


def train(data_args: data.DataArguments, args: PPOArguments, model_args: ModelConfig,
          cleanup: contextlib.ExitStack) -> list[dict]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    paths, reward_functions = validate(args, model_args)
    cleanup.callback(runs.lock_output_dir(args.output_dir))  # before the check: no other run starts there meanwhile
    runs.check_output_dir(args.output_dir, data_args.overwrite_output_dir, args.resume_from_checkpoint)
    accelerator = runs.make_accelerator(args)
    resume = runs.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    run = setup(data_args, args, model_args, paths, reward_functions, accelerator)
    # Every process built the same models from --seed; from here each samples from its own stream (TRL's
    # local_seed), else N processes would draw the same random numbers. Process 0 keeps the single-process stream.
    if accelerator.process_index > 0:
        set_seed(args.seed + accelerator.process_index * 100003)
    if data_args.overwrite_output_dir:  # last, once data and models loaded: a mistake above leaves the old run
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                runs.set_previous_run_aside(args.output_dir)
    model, unwrapped, optimizer, scheduler = run.model, run.unwrapped, run.optimizer, run.scheduler
    kl_controller = algorithms.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    score_moments = algorithms.RunningMoments()
    ema = actor_critic.initial_ema(accelerator, unwrapped, args.ema_decay)
    step, ptx_position = 0, 0  # ptx_position: PTX micro-batches consumed so far (the same count on every process)
    if resume:
        state = checkpoints.load_checkpoint(resume, accelerator, model, optimizer, scheduler, args, ema)
        resume = state["resumed_from"]  # an older checkpoint when the newest is damaged
        step, ptx_position = state["step"], state.get("ptx_position", 0)
        if args.adaptive_kl:  # the controller's state; without it, --kl_coef as given now
            kl_controller.value = state["kl_coef"]
        score_moments.__dict__.update(state["score_moments"])
        run_id = state.get("run_id") or checkpoints.new_run_id()
        logger.info(f"resumed from {resume} at step {step}")
    else:
        run_id = checkpoints.new_run_id()  # read on the main process only, which writes the checkpoints
    if step >= args.max_steps:
        logger.info(f"already at step {step} of --max_steps {args.max_steps}")
    metrics_file = checkpoints.start_metrics_file(accelerator, args, step, bool(resume))
    cleanup.callback(accelerator.end_training)
    weights_at_start = health.weight_metrics(accelerator, unwrapped)

    device, stop_token_id = accelerator.device, run.generation_config.eos_token_id
    stop = health.StopRequested()
    cleanup.callback(stop.restore)
    history, last_checkpoint = [], resume
    one_pass = update.one_pass_update(args)  # the critic's values from the update's forward pass, not from scoring
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="PPO")
    cleanup.callback(progress.close)
    while step < args.max_steps:
        started = time.perf_counter()
        # --- 1. rollout: the current policy answers this step's prompts ------------------------------------------
        prompts, rows = run.prompt_batch(step)
        queries, query_mask = rollout.left_pad(prompts, run.tokenizer.pad_token_id, device)
        unwrapped.eval()
        with actor_critic.gathered_for_generation(model, accelerator, args.gather_for_generation):
            sample = rollout.generate_rollout(unwrapped.actor, queries, query_mask, run.generation_config,
                                              args.generation_batch_size, run.logprobs_temperature)
        generated = time.perf_counter()

        # --- 2. score: log-probs under actor and reference, the critic's values (if any), and the reward: the
        #        weighted sum of its sources, the reward model's score and the reward functions' (weight 0: logged)
        scored = rollout.score_rollout(sample, unwrapped.actor, run.reference, None if one_pass else unwrapped.critic,
                                       run.reward_fn, args.temperature, args.generation_batch_size,
                                       accelerator.autocast)
        per_source = rewards.score_sources(scored["scores"], run.reward_functions, run.reward_sources, run.tokenizer,
                                           sample, rows)
        raw_scores = rewards.combine(per_source, args.reward_weights)
        scores, shaped = update.shape_scores(raw_scores, sample.has_stop, args, score_moments, accelerator)

        # --- 3. advantages: a KL penalty per token (unless --kl_in_loss), the score at the last one, then GAE;
        #        or, critic-free, one advantage per sequence from the other samples of its prompt (rloo, grpo) --
        mask = sample.response_mask.float()
        logprobs, ref_logprobs, values = (None if scored[k] is None else scored[k] * mask
                                          for k in ("logprobs", "ref_logprobs", "values"))
        kl = algorithms.kl_per_token(logprobs, ref_logprobs, args.kl_estimator, mask) * mask
        non_score_reward = torch.zeros_like(kl) if args.kl_in_loss else -kl_controller.value * kl
        def advantages_of(values):
            return update.advantages_and_returns(non_score_reward, shaped, values, sample.response_mask, args,
                                                 accelerator)

        advantages, returns = (None, None) if one_pass else advantages_of(values)
        scored_at = time.perf_counter()

        # --- 4. update: clipped policy and value losses, num_ppo_epochs passes over the rollout -------------------
        unwrapped.train()
        batch = dict(input_ids=sample.input_ids, attention_mask=sample.attention_mask, responses=sample.responses,
                     logprobs=logprobs, values=values, advantages=advantages, returns=returns, mask=mask,
                     ref_logprobs=ref_logprobs if args.kl_in_loss else None)
        batch = {k: v for k, v in batch.items() if v is not None}  # no values or returns without a critic
        stats, ptx_position = update.ppo_update(run, batch, args, sample.context, ema, ptx_position,
                                                kl_controller.value, advantages_of if one_pass else None)
        learning_rates = scheduler.get_last_lr()  # the rates this iteration used, for the metrics
        scheduler.step()
        step += 1
        if args.adaptive_kl:
            kl_controller.update(accelerator.reduce(kl.sum(1).mean(), "mean").item(), run.global_batch)
        updated = time.perf_counter()

        # --- 5. log and save --------------------------------------------------------------------------------------
        metrics = {"step": step, "episode": step * run.global_batch,
                   **update.iteration_metrics(accelerator, stats, kl, logprobs, non_score_reward, scores, shaped,
                                              sample, stop_token_id, rewards.source_means(per_source)),
                   "lr": learning_rates[0], **({"critic_lr": learning_rates[1]} if len(learning_rates) > 1 else {}),
                   "objective/kl_coef": kl_controller.value,
                   "time/generation_s": generated - started, "time/scoring_s": scored_at - generated,
                   "time/update_s": updated - scored_at, "memory/peak_gb": health.peak_memory_gb()}
        metrics["tokens_per_s"] = metrics["response_length_avg"] * run.global_batch / (updated - started)
        metrics.update(health.weight_metrics(accelerator, unwrapped))
        problem = health.divergence(metrics, args.max_kl, weights_at_start)
        if problem:
            raise health.TrainingDiverged(f"training diverged at step {step}: {problem} (lower --learning_rate, set "
                                          f"--score_clip, or check the reward model); the last good checkpoint is "
                                          f"{last_checkpoint or 'none'} and was left untouched")
        history.append(metrics)
        if accelerator.is_main_process:
            with metrics_file.open("a") as out:
                out.write(json.dumps(metrics) + "\n")
        accelerator.log(metrics, step=step)
        progress.update(1)
        progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                             **({name: f"{metrics[f'rewards/{name}']:.3f}" for name in run.reward_sources}
                                if len(run.reward_sources) > 1 else {}))
        if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
            update.log_samples(run.tokenizer, sample, raw_scores, step, args.num_samples)
        recent = [m["objective/kl"] for m in history[-3:]]  # one iteration's KL is noisy: the last 3
        recent_kl = sum(recent) / len(recent)
        if args.kl_budget and recent_kl >= args.kl_budget:
            accelerator.print(f"KL budget reached at step {step}: KL {recent_kl:.3f} over the last {len(recent)} "
                              f"iterations >= --kl_budget {args.kl_budget}; the run ends here")
            break
        stop_now = accelerator.reduce(torch.tensor(float(stop.requested), device=device), "sum").item() > 0
        if step % args.save_steps == 0 or stop_now:
            state = {"step": step, "kl_coef": kl_controller.value, "score_moments": vars(score_moments),
                     "data_position": step * run.global_batch, "ptx_position": ptx_position,
                     "max_steps": args.max_steps, "run_id": run_id,
                     "advantage_estimator": args.advantage_estimator, "num_generations": args.num_generations}
            last_checkpoint = checkpoints.save_checkpoint(accelerator, model, optimizer, scheduler, state, args,
                                                          run.tokenizer, ema)
        if stop_now:
            accelerator.print(f"stopped at step {step} on request; resume with --resume_from_checkpoint "
                              f"{last_checkpoint}")
            return history
    progress.close()

    checkpoints.save_final(accelerator, model, args, data_args, model_args, run.tokenizer, paths, ema)
    if accelerator.is_main_process:
        runs.drop_previous_run(args.output_dir)  # the final model is complete: an overwritten run may go now
        plots.plot_ppo(args.output_dir)  # OUTPUT_DIR/ppo_curves.png from metrics.jsonl
        logged = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        if logged:  # from the run's first step, also after a resume
            print(f"PPO done: mean score {logged[0]['objective/scores']:.3f} -> "
                  f"{logged[-1]['objective/scores']:.3f}, KL {logged[-1]['objective/kl']:.3f}, "
                  f"actor in {args.output_dir}", flush=True)
    return history


if __name__ == "__main__":
    main(*arguments.parse_args(ARGUMENTS))
