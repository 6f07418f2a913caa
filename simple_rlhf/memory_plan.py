"""Memory plans: what each step holds at its peak, the knobs that make it fit, the line each step prints."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

from simple_rlhf.errors import describe
from simple_rlhf import memory

logger = logging.getLogger("simple_rlhf")


@dataclass
class Setup:
    """Everything the plan depends on, normalised from a step's arguments (see setup_from_args)."""

    step: str
    models: dict  # name -> path of the model(s): sft/reward/dpo: {'model': ...}; ppo: {'sft': ..., 'reward': ...}
    launch: memory.Launch
    dtype: str | None = "bfloat16"
    use_peft: bool = False
    lora_r: int = 16
    lora_targets: object = None
    lora_dropout: float = 0.0
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    eval_batch: int = 8
    max_length: int = 512  # sft / reward / dpo
    max_prompt_length: int = 256  # ppo
    response_length: int = 256
    generation_batch: int = 8
    other_tokenizer: bool = False  # ppo: the reward model reads other tokens, so the critic starts from the SFT model
    critic_free: bool = False  # ppo: --advantage_estimator rloo / grpo, no critic at all
    device: str = "cuda"  # "cpu": the CPU code paths (for bench/memory_validate.py)
    dropout_off: bool = True  # dpo: --disable_dropout (TRL's default)
    precompute_ref: bool = False  # dpo: --precompute_ref_log_probs, so full fine-tuning keeps no reference copy


@dataclass
class Line:
    role: str
    kind: str
    gpu: float  # bytes at the peak
    cpu: float = 0.0  # bytes offloaded to CPU memory (not in the GPU total)
    note: str = ""


def _model(setup: Setup, path: str, seq_cls: bool, trained: bool, launch: memory.Launch) -> memory.Model:
    arch = memory.read_arch(path, seq_cls)
    dtype_bytes = arch.dtype_bytes if setup.dtype in (None, "auto") else memory.DTYPE_BYTES.get(setup.dtype, 4)
    if setup.dtype is None:
        dtype_bytes = 4  # transformers loads float32 unless told otherwise
    if launch.zero_stage and launch.bf16 and trained:
        dtype_bytes = 2  # the DeepSpeed engine runs the trained model in bf16
    lora_bytes = 2 if (launch.zero_stage and launch.bf16) else (4 if dtype_bytes < 4 else dtype_bytes)
    return memory.Model(arch=arch, dtype_bytes=dtype_bytes, quant_4bit=setup.load_in_4bit and setup.use_peft,
                 lora_r=setup.lora_r if setup.use_peft else 0, lora_targets=setup.lora_targets,
                 lora_dropout=setup.lora_dropout, lora_bytes=lora_bytes, trained=trained, seq_cls=seq_cls)


def _act_bytes(m: memory.Model, launch: memory.Launch) -> int:
    return 2 if (m.dtype_bytes == 2 or launch.bf16 or m.quant_4bit) else 4


def _static_lines(role: str, m: memory.Model, launch: memory.Launch, weights: bool = True) -> list[Line]:
    lines = []
    if weights:
        kind = "weights (4-bit)" if m.quant_4bit else f"weights ({m.dtype_bytes * 8}-bit)"
        share = launch.processes if (launch.zero_stage == 3 and m.trained) else 1
        gpu = 0 if (launch.offload_param and launch.zero_stage == 3 and m.trained) else memory.weight_bytes(m) / share
        lines.append(Line(role, kind, gpu, memory.weight_bytes(m) - gpu))
    if memory.adapter_bytes(m):
        lines.append(Line(role, f"LoRA r={m.lora_r} ({memory.trainable_params(m) / 1e6:.1f}M)", memory.adapter_bytes(m)))
    state = memory.training_state_bytes(m, launch)
    for kind in ("gradients", "optimizer"):
        if kind in state["gpu"] or kind in state["cpu"]:
            lines.append(Line(role, kind, state["gpu"].get(kind, 0), state["cpu"].get(kind, 0),
                              "offloaded" if kind in state["cpu"] else ""))
    return lines


def plan_trainer_step(setup: Setup) -> tuple[list, dict, list]:
    """sft.py / reward.py: one model, trained by TRL's trainer (reward: chosen and rejected in one batch)."""
    launch, reward = setup.launch, setup.step == "reward"
    m = _model(setup, setup.models["model"], reward, True, launch)
    role = "reward model" if reward else "policy"
    lines = _static_lines(role, m, launch)
    lines.append(Line(role, "DeepSpeed gradient bucket", memory.deepspeed_bucket_bytes(launch, memory.trainable_params(m))))
    e = _act_bytes(m, launch)
    batch = setup.micro_batch * (2 if reward else 1)
    dropout = 0.0 if reward else _config_dropout(m.arch.name)  # RewardTrainer turns dropout off, SFTTrainer doesn't
    acts = memory.training_activations(m, batch, setup.max_length, e, setup.gradient_checkpointing, dropout)
    logits = 0 if reward else memory.sft_logits_bytes(m.arch, batch * setup.max_length, e, not m.lora_r, setup.device)
    eval_tokens = setup.eval_batch * (2 if reward else 1) * setup.max_length
    peak_eval = memory.forward_transient_bytes(m, eval_tokens, e) + (0 if reward else memory.sft_logits_bytes(
        m.arch, eval_tokens, e, False, setup.device) - eval_tokens * m.arch.hidden * 4)
    phases = {"train": acts["saved"] + max(logits, acts["backward"]), "eval": peak_eval,
              "optimizer step": memory.optimizer_step_bytes(m, launch)}
    other = memory.training_activations(m, batch, setup.max_length, e, not setup.gradient_checkpointing, dropout)
    details = [("train", role, f"activations saved, checkpointed={setup.gradient_checkpointing}", acts["saved"]),
               ("train", role, f"activations saved, checkpointed={not setup.gradient_checkpointing} (alternative)",
                other["saved"]),
               ("train", role, "backward in flight" + (" + one layer recomputed" if setup.gradient_checkpointing
                                                        else ""), acts["backward"]),
               ("train", role, "logits / log-probs" if logits else "score head (negligible)", logits),
               ("eval", role, f"forward without gradients (batch {setup.eval_batch})", peak_eval),
               ("optimizer step", role, "AdamW step temporaries", phases["optimizer step"])]
    peak = max(phases, key=phases.get)
    if peak == "optimizer step":
        lines.append(Line(role, "optimizer step temporaries", phases[peak]))
    elif peak == "train":
        shape = f"{setup.micro_batch} pairs = {batch}" if reward else f"{batch}"
        lines.append(Line(role, f"activations (micro-batch {shape} x {setup.max_length}, "
                          f"{'checkpointed' if setup.gradient_checkpointing else 'all saved'})",
                          acts["saved"] + max(0, acts["backward"] - logits)))
        lines.append(Line(role, "logits / log-probs (fused LM head tiles)", logits))
    else:
        lines.append(Line(role, f"evaluation forward (batch {setup.eval_batch})", peak_eval))
    return lines, phases, details


@functools.lru_cache(maxsize=16)
def _config_dropout(name: str) -> float:
    config = memory._config_for(name)
    return float(getattr(config, "dropout", 0.0) or getattr(config, "hidden_dropout", 0.0) or 0.0)


def plan_dpo(setup: Setup) -> tuple[list, dict, list]:
    """dpo.py: the policy trained by TRL's DPOTrainer, chosen and rejected in one batch (2 x micro-batch), and the
    reference: with LoRA the policy with its adapter off (no copy), in full fine-tuning a frozen copy (none when its
    log-probs are precomputed). Each train step runs the policy forward, the reference forward without gradients
    (while the policy's activations are saved), then backward; both forwards go through TRL's fused LM head."""
    launch = setup.launch
    m = _model(setup, setup.models["model"], False, True, launch)
    lines = _static_lines("policy", m, launch)
    copy = not setup.use_peft and not setup.precompute_ref
    share = launch.processes if launch.zero_stage == 3 else 1
    lines.append(Line("reference", "weights: the policy's, LoRA off" if setup.use_peft else
                      f"weights ({m.dtype_bytes * 8}-bit), a frozen copy" if copy else "none (log-probs precomputed)",
                      memory.weight_bytes(m) / share if copy else 0,
                      note="" if copy else "shared" if setup.use_peft else "precomputed"))
    lines.append(Line("policy", "DeepSpeed gradient bucket",
                      memory.deepspeed_bucket_bytes(launch, memory.trainable_params(m))))
    e, batch = _act_bytes(m, launch), 2 * setup.micro_batch
    tokens, eval_tokens = batch * setup.max_length, 2 * setup.eval_batch * setup.max_length
    dropout = 0.0 if setup.dropout_off else _config_dropout(m.arch.name)
    acts = memory.training_activations(m, batch, setup.max_length, e, setup.gradient_checkpointing, dropout)
    logits = memory.sft_logits_bytes(m.arch, tokens, e, not m.lora_r, setup.device)

    def forward(n):  # a forward without gradients: one layer's transients and a tile of the fused LM head
        return memory.forward_transient_bytes(m, n, e) + memory.sft_logits_bytes(m.arch, n, e, False, setup.device) - \
            n * m.arch.hidden * 4

    reference = 0 if setup.precompute_ref else forward(tokens)
    phases = {"train": acts["saved"] + max(logits, acts["backward"], reference), "eval": forward(eval_tokens),
              "optimizer step": memory.optimizer_step_bytes(m, launch)}
    other = memory.training_activations(m, batch, setup.max_length, e, not setup.gradient_checkpointing, dropout)
    checkpointed = setup.gradient_checkpointing
    details = [("train", "policy", f"activations saved, checkpointed={checkpointed}", acts["saved"]),
               ("train", "policy", f"activations saved, checkpointed={not checkpointed} (alternative)", other["saved"]),
               ("train", "policy", "backward in flight" + (" + one layer recomputed" if checkpointed else ""),
                acts["backward"]),
               ("train", "policy", "log-probs (fused LM head tiles)", logits),
               ("train", "reference", "forward without gradients" if reference else "none (precomputed)", reference),
               ("eval", "policy / reference", f"forward without gradients (batch {setup.eval_batch} pairs)",
                phases["eval"]),
               ("optimizer step", "policy", "AdamW step temporaries", phases["optimizer step"])]
    peak = max(phases, key=phases.get)
    if peak == "train":
        lines.append(Line("policy", f"activations (micro-batch {setup.micro_batch} pairs = {batch} x "
                          f"{setup.max_length}, {'checkpointed' if checkpointed else 'all saved'})", acts["saved"]))
        transient = max(logits, acts["backward"], reference)
        what = "log-probs (fused LM head tiles)" if transient == logits else "reference forward" \
            if transient == reference else "backward in flight"
        lines.append(Line("reference" if transient == reference else "policy", what, transient))
    elif peak == "eval":
        lines.append(Line("policy", f"evaluation forward (batch {setup.eval_batch} pairs)", phases["eval"]))
    else:
        lines.append(Line("policy", "optimizer step temporaries", phases[peak]))
    return lines, phases, details


def plan_ppo(setup: Setup) -> tuple[list, dict, list]:
    """ppo.py: actor + reference (the actor with LoRA off), critic + reward model (the critic with LoRA off); with
    a critic-free estimator (critic_free), the reward model alone; without a reward model (reward functions only),
    the critic (GAE) starts from the SFT policy."""
    launch = setup.launch
    actor = _model(setup, setup.models["sft"], False, True, launch)
    reward = _model(setup, setup.models["reward"], True, False, launch) if setup.models.get("reward") else None
    # ppo.build_models: the critic is the reward model under its own LoRA unless --critic_model_path is given or
    # the reward model reads other tokens (then the SFT backbone); without LoRA it is a copy.
    critic_path = setup.models.get("critic") or setup.models["sft" if setup.other_tokenizer or not reward else "reward"]
    critic = None if setup.critic_free else _model(setup, critic_path, True, True, launch)
    trained = [m for m in (actor, critic) if m is not None]
    both = "actor + critic" if critic else "actor"
    shared_ref = setup.use_peft
    shared_reward = critic is not None and reward is not None and setup.use_peft and not setup.models.get("critic") and \
        not setup.other_tokenizer
    lines = _static_lines("actor", actor, launch)
    lines.append(Line("reference", "weights: the actor's, LoRA off" if shared_ref else
                      f"weights ({actor.dtype_bytes * 8}-bit), a copy", 0 if shared_ref else memory.weight_bytes(actor),
                      note="shared" if shared_ref else ""))
    if critic:
        lines += _static_lines("critic", critic, launch, weights=not shared_reward)
    if reward is not None:
        lines.append(Line("reward model", f"weights ({reward.dtype_bytes * 8 if not reward.quant_4bit else 4}-bit)" +
                          (", also the critic's (its LoRA off)" if shared_reward else ""), memory.weight_bytes(reward),
                          note="shared" if shared_reward else ""))
    trainable = sum(memory.trainable_params(m) for m in trained)
    lines.append(Line(both, "DeepSpeed gradient bucket", memory.deepspeed_bucket_bytes(launch, trainable)))

    e = _act_bytes(actor, launch)
    b, length, r = setup.micro_batch, setup.max_prompt_length + setup.response_length, setup.response_length
    g = setup.generation_batch
    no_activations = {"saved": 0, "backward": 0}
    actor_acts = memory.training_activations(actor, b, length, e, setup.gradient_checkpointing, 0.0)
    critic_acts = memory.training_activations(critic, b, length, e, setup.gradient_checkpointing, 0.0) if critic else \
        no_activations
    logits = memory.ppo_logits_bytes(actor.arch, b, length, r, e)
    backward = max(actor_acts["backward"], critic_acts["backward"])
    peak_train = actor_acts["saved"] + critic_acts["saved"] + max(logits, backward)
    kv = memory.kv_cache_bytes(actor.arch, g, length, e)
    peak_generate = kv + memory.forward_transient_bytes(actor, g * setup.max_prompt_length, e) + g * actor.arch.vocab * 8
    peak_score = max(memory.scoring_logits_bytes(actor.arch, g, length, r, e) + memory.forward_transient_bytes(actor, g * length, e),
                     memory.forward_transient_bytes(critic or reward or actor, g * length, e))
    phases = {"train": peak_train, "generate": peak_generate, "score": peak_score,
              "optimizer step": sum(memory.optimizer_step_bytes(m, launch) for m in trained)}
    checkpointed = setup.gradient_checkpointing
    other = [memory.training_activations(m, b, length, e, not checkpointed, 0.0)["saved"] for m in trained]
    details = [("train", "actor", f"activations saved, checkpointed={checkpointed}", actor_acts["saved"]),
               ("train", "actor", f"activations saved, checkpointed={not checkpointed} (alternative)", other[0])]
    if critic:
        details += [("train", "critic", f"activations saved, checkpointed={checkpointed}", critic_acts["saved"]),
                    ("train", "critic", f"activations saved, checkpointed={not checkpointed} (alternative)", other[1])]
    details += [("train", both, "backward in flight" + (" + one layer recomputed" if checkpointed else ""),
                 backward),
                ("train", "actor", f"logits + float32 log-prob / entropy copies (micro-batch {b})", logits),
                ("generate", "actor", f"KV cache ({g} x {length} tokens)", kv),
                ("generate", "actor", "prefill forward and sampling", peak_generate - kv),
                ("score", "actor / reference", f"logits + float32 log-prob copy, forward (batch {g})", peak_score),
                ("optimizer step", both, "AdamW step temporaries", phases["optimizer step"])]
    phase = max(phases, key=phases.get)
    if phase == "optimizer step":
        lines.append(Line(both, "optimizer step temporaries", phases[phase]))
    elif phase == "train":
        lines.append(Line("actor", f"activations (micro-batch {b} x {length}, "
                          f"{'checkpointed' if setup.gradient_checkpointing else 'all saved'})",
                          actor_acts["saved"] + max(0, backward - logits)))
        lines.append(Line("actor", "logits / log-probs (update)", logits))
        if critic:
            lines.append(Line("critic", "activations", critic_acts["saved"]))
    elif phase == "generate":
        lines.append(Line("actor", f"generation KV cache ({g} x {length})", kv))
        lines.append(Line("actor", "generation prefill", peak_generate - kv))
    else:
        lines.append(Line("actor", f"scoring logits and forward (batch {g})", peak_score))
    return lines, phases, details


@dataclass
class Plan:
    setup: Setup
    lines: list
    phases: dict  # phase -> bytes of its transient peak
    details: list  # (phase, role, what, bytes): the transients of every phase, and the checkpointing alternative
    allocated: float  # peak of live tensors on the GPU
    margin: float
    total: float

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes

    def by_role(self) -> dict:
        roles = {}
        for line in self.lines:
            roles[line.role] = roles.get(line.role, 0) + line.gpu
        return roles

    def one_line(self) -> str:
        roles = [(role, b) for role, b in self.by_role().items() if b >= 0.005 * memory.GIB]
        parts = " + ".join(f"{role} {b / memory.GIB:.2f}" for role, b in roles)
        return (f"memory estimate: {self.total / memory.GIB:.2f} GiB peak per GPU = {parts} + margin {self.margin / memory.GIB:.2f} "
                f"GiB ({self.setup.launch.describe()}; peak in {max(self.phases, key=self.phases.get)}; "
                f"python bench/memory.py for the table)")


def make_plan(setup: Setup) -> Plan:
    planner = {"ppo": plan_ppo, "dpo": plan_dpo}.get(setup.step, plan_trainer_step)
    lines, phases, details = planner(setup)
    lines = [line for line in lines if line.gpu or line.cpu or line.note]
    allocated = sum(line.gpu for line in lines)
    margin = memory.margin_bytes(allocated)
    return Plan(setup, lines, phases, details, allocated, margin, allocated + margin)


KNOBS = ("generation_batch", "micro_batch", "gradient_checkpointing", "offload", "load_in_4bit")


def _turn(setup: Setup, knob: str) -> Setup | None:
    """The setup with one knob turned one notch cheaper, or None when it is already at its cheapest."""
    if knob == "generation_batch" and setup.step == "ppo" and setup.generation_batch > 1:
        return replace(setup, generation_batch=setup.generation_batch // 2)
    if knob == "micro_batch" and setup.micro_batch > 1:
        return replace(setup, micro_batch=setup.micro_batch // 2,
                       eval_batch=max(1, min(setup.eval_batch, setup.micro_batch // 2)))
    if knob == "gradient_checkpointing" and not setup.gradient_checkpointing:
        return replace(setup, gradient_checkpointing=True)
    if knob == "offload" and not setup.launch.offload_optimizer:
        return replace(setup, launch=replace(setup.launch, zero_stage=max(2, setup.launch.zero_stage),
                                             offload_optimizer=True, bf16=True))
    if knob == "load_in_4bit" and setup.use_peft and not setup.load_in_4bit:
        return replace(setup, load_in_4bit=True)
    return None


def knob_flags(before: Setup, after: Setup) -> list[str]:
    flags = []
    if after.generation_batch != before.generation_batch:
        flags.append(f"--generation_batch_size {after.generation_batch}")
    if after.micro_batch != before.micro_batch:
        flags.append(f"--per_device_train_batch_size {after.micro_batch} (x{before.micro_batch // after.micro_batch} "
                     "--gradient_accumulation_steps keeps the batch)")
    if after.gradient_checkpointing != before.gradient_checkpointing:
        flags.append("--gradient_checkpointing true")
    if after.launch.offload_optimizer != before.launch.offload_optimizer:
        flags.append("accelerate launch --config_file accelerate_config.yaml (ZeRO-2, optimizer on CPU)")
    if after.load_in_4bit != before.load_in_4bit:
        flags.append("--load_in_4bit true")
    return flags


def fitting_knobs(setup: Setup, gpu_bytes: float) -> list[tuple[list[str], Plan]]:
    """The cheapest changes that make the plan fit: each knob alone (turned as far as needed), cheapest first;
    if none fits alone, the knobs combined in that order."""
    found = []
    for knob in KNOBS:
        current = setup
        while (turned := _turn(current, knob)) is not None:
            current = turned
            plan = make_plan(current)
            if plan.fits(gpu_bytes):
                found.append((knob_flags(setup, current), plan))
                break
    if found:
        return found
    current = setup
    for knob in KNOBS:
        while (turned := _turn(current, knob)) is not None:
            current = turned
            plan = make_plan(current)
            if plan.fits(gpu_bytes):
                return [(knob_flags(setup, current), plan)]
    return []


def setup_from_args(step: str, args, model_args, launch: memory.Launch, same_tokenizer: bool = True) -> Setup:
    """The Setup of a step from its parsed arguments (sft/reward/dpo: TRL's SFTConfig / RewardConfig / DPOConfig;
    ppo: PPOArguments) and TRL's ModelConfig."""
    common = dict(launch=launch, dtype=model_args.dtype, use_peft=bool(model_args.use_peft),
                  lora_r=model_args.lora_r, lora_targets=model_args.lora_target_modules,
                  lora_dropout=model_args.lora_dropout, load_in_4bit=bool(model_args.load_in_4bit),
                  gradient_checkpointing=bool(args.gradient_checkpointing),
                  micro_batch=args.per_device_train_batch_size)
    if not launch.bf16 and getattr(args, "bf16", False):
        common["launch"] = replace(launch, bf16=True)
    if step == "ppo":
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
        return Setup(step=step, models={"sft": args.sft_model_path, "reward": args.reward_model_path,
                                        "critic": args.critic_model_path},
                     max_prompt_length=args.max_prompt_length, response_length=args.response_length,
                     generation_batch=args.generation_batch_size or rollout,
                     other_tokenizer=not same_tokenizer,
                     critic_free=getattr(args, "advantage_estimator", "gae") != "gae",
                     **common)
    if step == "dpo":
        common.update(dropout_off=bool(args.disable_dropout), precompute_ref=bool(args.precompute_ref_log_probs))
    return Setup(step=step, models={"model": model_args.model_name_or_path}, eval_batch=args.per_device_eval_batch_size,
                 max_length=args.max_length or 1024, **common)


def common_describe(error: Exception) -> str:
    return str(error).splitlines()[0][:400] if isinstance(error, memory.PlanError) else describe(error)


def visible_gpu_bytes() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def log_estimate(step: str, args, model_args, same_tokenizer: bool = True) -> Plan | None:
    """Log the step's memory estimate as one line (a warning when it exceeds the visible GPU); never raises."""
    try:
        plan = make_plan(setup_from_args(step, args, model_args, memory.launch_from_env(), same_tokenizer))
    except Exception as error:  # the estimate must never stop a run
        logger.info(f"memory estimate: unavailable ({common_describe(error)})")
        return None
    gpu = visible_gpu_bytes()
    if gpu is not None and not plan.fits(gpu):
        logger.warning(f"{plan.one_line()}: more than this GPU's {gpu / memory.GIB:.1f} GiB; see python bench/memory.py "
                       f"--config ... for the knobs that make it fit")
    else:
        logger.info(plan.one_line() + ("" if gpu else "; no GPU here"))
    return plan
