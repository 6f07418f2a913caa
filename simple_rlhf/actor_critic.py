"""The PPO models: actor and critic in one module, the frozen reference and reward model, ZeRO-3 gathering helpers."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch.nn as nn
from trl import ModelConfig, get_peft_config

from simple_rlhf import models, rollout

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


def keep_4bit_weights_trainable(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster inference kernel the
    first time it runs in eval mode (our rollout) and never packs them back; that kernel has no backward, so the
    next training forward fails ("a view of a leaf Variable ... in-place operation"). PPO alternates the two
    modes, so keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_models(args, model_args: ModelConfig, tokenizer, reward_tokenizer, paths: dict):
    """Load the SFT policy, reward model and critic; return (actor_critic, reference or None, reward or None).

    reference None means "the actor with its adapter off"; reward None means "the critic with its adapter off", or
    no reward model at all when paths["reward"] is None (reward functions alone).
    A critic-free estimator (rloo, grpo) builds no critic: actor_critic.critic is None, the reward model stands alone.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from transformers.integrations import is_deepspeed_zero3_enabled

    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    zero3 = is_deepspeed_zero3_enabled()  # then from_pretrained builds every model partitioned (deepspeed.zero.Init)
    actor = models.load_model(model_args, AutoModelForCausalLM, paths["sft"], "--sft_model_path")
    reward = None  # no reward model: reward functions alone (ppo.py --reward_funcs)
    if paths["reward"] is not None:
        reward = models.load_model(model_args, AutoModelForSequenceClassification, paths["reward"],
                                   "--reward_model_path", num_labels=1)
        reward.config.pad_token_id = reward_tokenizer.pad_token_id
    if args.advantage_estimator != "gae":
        critic = None
    elif paths["critic"] is not None:
        critic = models.load_model(model_args, AutoModelForSequenceClassification, paths["critic"],
                                   "--critic_model_path", num_labels=1)
    elif reward is None or not rollout.same_tokenizer(tokenizer, reward_tokenizer):
        # Values must line up with the actor's tokens, so the critic cannot read the reward model's tokens; without
        # a reward model it starts from the SFT policy too, with a fresh value head.
        critic = models.load_model(model_args, AutoModelForSequenceClassification, paths["sft"], "--sft_model_path",
                                   num_labels=1)
    elif model_args.use_peft:
        critic = reward  # shared: the reward model is the critic with its adapter off
    else:
        # A copy of the reward model; under ZeRO-3 loaded afresh, since a deepcopy of a partitioned model copies its
        # empty shards without DeepSpeed's bookkeeping.
        critic = models.load_model(model_args, AutoModelForSequenceClassification, paths["reward"],
                                   "--reward_model_path", num_labels=1) if zero3 else copy.deepcopy(reward)
    shared = reward is not None and critic is reward
    if quantized:
        for model in {id(m): m for m in (actor, reward, critic) if m is not None}.values():
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
            keep_4bit_weights_trainable(model)
    reference = None
    if not model_args.use_peft:
        reference = (models.load_model(model_args, AutoModelForCausalLM, paths["sft"], "--sft_model_path") if zero3
                     else copy.deepcopy(actor)).eval().requires_grad_(False)
    if reward is not None:
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
            changed += models.disable_dropout(model)  # after PEFT, which adds its own lora_dropout modules
    actor_critic = ActorCritic(actor, critic)
    actor_critic.dropout_changes = changed  # put back in the configs while saving (dropout_config_restored)
    return actor_critic, reference, (None if shared else reward)


def prepare_frozen(model, accelerator):
    """A frozen model (the reference without LoRA, a reward model of its own) ready for this launch: under ZeRO-3,
    a DeepSpeed inference engine without optimizer (TRL's prepare_deepspeed), whose hooks gather each layer's
    shards for its forward pass, returned as its module (so it is called like any model); otherwise the model
    itself. None stays None."""
    plugin = accelerator.state.deepspeed_plugin
    if model is None or plugin is None or plugin.zero_stage != 3:
        return model
    from trl.models.utils import prepare_deepspeed

    engine = prepare_deepspeed(model, accelerator)
    # Kept alive with the module it wraps; set past nn.Module's __setattr__, which would register the engine as a
    # submodule of its own module (a cycle).
    object.__setattr__(engine.module, "_inference_engine", engine)
    return engine.module


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


def initial_ema(accelerator, unwrapped: ActorCritic, decay: float | None) -> dict | None:
    """The EMA starts from the actor's initial weights (as DeepSpeed-Chat's copy of the actor does), in float32."""
    if decay is None:
        return None
    with zero3_gathered(accelerator, trainable_parameters(unwrapped.actor)):
        return {k: v.float() for k, v in trainable_state(unwrapped.actor, cpu=False).items()}


def gathered_for_generation(model, accelerator, gather: bool):
    """Under ZeRO-3 the actor's parameters are sharded: gather them once for the whole generate() call (otherwise
    every new token would gather every layer). A no-op for other setups, or with --gather_for_generation false."""
    if not gather:
        return contextlib.nullcontext()
    return zero3_gathered(accelerator, accelerator.unwrap_model(model).actor.parameters())
