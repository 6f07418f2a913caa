"""Will it fit? The peak GPU memory of a step (sft, reward, ppo), predicted from its arguments before it runs.

Read top to bottom:
1. the launch: DeepSpeed ZeRO stage, offload and processes, from an accelerate config file or from the environment
   `accelerate launch` sets;
2. the architecture: parameter counts and the shapes the arithmetic needs, from the model's config.json (built on
   the meta device, so no weights are read), or from ../shared/model-configs for a hub id that is not cached;
3. the arithmetic, one small function per kind of memory: weights, LoRA, gradients and optimizer states, DeepSpeed's
   gradient bucket, activations per micro-batch (with and without gradient checkpointing), the logits and log-prob
   tensors, the generation KV cache, and a margin for the CUDA context and the allocator;
4. the plan of each step, by role (actor, reference, critic, reward model) and kind, and the cheapest knobs that make
   a plan fit;
5. `log_estimate`: the one line sft.py, reward.py and ppo.py print at start.

What the activation arithmetic counts follows the code that runs (transformers' OPT-style decoder layer with SDPA,
PEFT's LoRA layers, TRL's fused LM head in SFT, ppo.py's log-prob and entropy tensors); bench/memory.py --validate
compares it with what torch allocates on the CPU (README, Will it fit?).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger("simple_rlhf")

GIB = 2**30
SHARED_CONFIGS = Path(__file__).resolve().parent.parent / "shared" / "model-configs"
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); accelerate leaves it
SFT_LOGPROB_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary per tile (kernels/chunked_logprob.py)
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces: outside torch's allocator, GPU-only
FRAGMENTATION = 0.10  # caching-allocator slack over the peak of live tensors: GPU-only
BNB_4BIT_BYTES = 0.5 + 4 / 64  # NF4: half a byte per weight + one float32 absmax per block of 64


class PlanError(Exception):
    """The plan cannot be made (e.g. a model's config is not available offline): one line for the user."""


# ----------------------------------------------------------------------------------------------------------------
# 1. The launch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """How the step is launched: what decides where gradients and optimizer states live."""

    zero_stage: int = 0  # 0: no DeepSpeed (plain python, DDP)
    offload_optimizer: bool = False
    offload_param: bool = False
    processes: int = 1
    bf16: bool = False  # mixed precision (DeepSpeed then casts the trained model to bf16)

    def describe(self) -> str:
        if not self.zero_stage:
            return f"no DeepSpeed, {self.processes} process(es)"
        where = "optimizer on CPU" if self.offload_optimizer else "optimizer on GPU"
        return f"DeepSpeed ZeRO-{self.zero_stage}, {where}" + (", params on CPU" if self.offload_param else "") + \
            f", {self.processes} process(es)"


def launch_from_file(path: str | None) -> Launch:
    """An accelerate config file (accelerate_config.yaml); None or 'none': plain python, one process."""
    if path in (None, "none"):
        return Launch()
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise PlanError(f"--accelerate_config {path}: cannot read it ({error.strerror})")
    ds = config.get("deepspeed_config") or {}
    deepspeed = config.get("distributed_type") == "DEEPSPEED"
    return Launch(zero_stage=int(ds.get("zero_stage", 0)) if deepspeed else 0,
                  offload_optimizer=deepspeed and ds.get("offload_optimizer_device", "none") in ("cpu", "nvme"),
                  offload_param=deepspeed and ds.get("offload_param_device", "none") in ("cpu", "nvme"),
                  processes=int(config.get("num_processes", 1)),
                  bf16=config.get("mixed_precision") == "bf16")


def launch_from_env() -> Launch:
    """What `accelerate launch` exported for this process (plain python: no DeepSpeed, one process)."""
    env = os.environ
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Launch(zero_stage=int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0)) if deepspeed else 0,
                  offload_optimizer=deepspeed and env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                                                          "none") in ("cpu", "nvme"),
                  offload_param=deepspeed and env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") in
                  ("cpu", "nvme"),
                  processes=int(env.get("WORLD_SIZE", 1)),
                  bf16=env.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16")


# ----------------------------------------------------------------------------------------------------------------
# 2. The architecture
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """What the arithmetic needs from a model: counts from the model built on the meta device, sizes from its config."""

    name: str
    params: int  # every parameter (tied embeddings once)
    linear_params: int  # weights of the nn.Linear layers bitsandbytes quantizes (all but the output head)
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_dim: int  # width of the key (and value) projection
    vocab: int
    gated: bool  # SwiGLU-style MLP (gate * up): more saved tensors than fc1 -> act -> fc2
    dtype_bytes: int  # the checkpoint's own dtype, for dtype 'auto'
    layer_linears: tuple  # ((name, in, out), ...) of one decoder layer
    head_params: int  # parameters of the task head (lm_head if untied, score)


def _config_for(name: str):
    """A transformers config for a folder, a hub id in the local cache, or a hub id with a file in ../shared."""
    from transformers import AutoConfig

    import common

    if name == common.BUILTIN_MODEL or Path(name).expanduser().exists():
        path = common.resolve_model_path(name)
        base = common.adapter_base(path)
        return _config_for(base) if base else AutoConfig.from_pretrained(path)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    shared = SHARED_CONFIGS / f"{name.split('/')[-1]}.json"
    if shared.exists():
        return AutoConfig.for_model(**json.loads(shared.read_text()))
    raise PlanError(f"{name}: its config.json is not available offline (not a folder, not in the hub cache, not in "
                    f"{SHARED_CONFIGS}); download it (hf download {name} config.json) or give a local folder")


@functools.lru_cache(maxsize=16)
def read_arch(name: str, sequence_classifier: bool = False) -> Arch:
    """The architecture of a model (folder, adapter folder, hub id): built on the meta device, nothing loaded."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _config_for(name)
    if sequence_classifier:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if sequence_classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    text = config.get_text_config()
    layers = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == text.num_hidden_layers][0]
    layer_linears = tuple((n, m.in_features, m.out_features) for n, m in layers[0].named_modules()
                          if isinstance(m, nn.Linear))
    head = model.get_output_embeddings() if not sequence_classifier else model.score
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_params = 0 if (head is None or tied) else head.weight.numel()
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) - head_params
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    names = {n.split(".")[-1] for n, _, _ in layer_linears}
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return Arch(name=name, params=sum(p.numel() for p in model.parameters()), linear_params=linear_params,
                layers=text.num_hidden_layers, hidden=text.hidden_size,
                ffn=getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * text.hidden_size,
                heads=heads, kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
                vocab=text.vocab_size, gated="gate_proj" in names, dtype_bytes=DTYPE_BYTES.get(
                    dtype.replace("torch.", ""), 4), layer_linears=layer_linears, head_params=head_params)


def lora_targets(arch: Arch, targets) -> list[tuple[str, int, int]]:
    """The (name, in, out) of one layer's linears that LoRA adapts (PEFT matches on the last name component)."""
    if targets in (None, [], ()):
        targets = ["q_proj", "v_proj"]  # PEFT's default for OPT / Llama-style models
    if targets == "all-linear" or targets == ["all-linear"]:
        return list(arch.layer_linears)
    wanted = set([targets] if isinstance(targets, str) else targets)
    return [(n, i, o) for n, i, o in arch.layer_linears if n.split(".")[-1] in wanted]


def lora_params(arch: Arch, targets, r: int) -> int:
    return arch.layers * sum(r * (i + o) for _, i, o in lora_targets(arch, targets))


# ----------------------------------------------------------------------------------------------------------------
# 3. The arithmetic (bytes)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Model:
    """One copy of weights in the run and how it is trained."""

    arch: Arch
    dtype_bytes: int  # weights in memory
    quant_4bit: bool = False
    lora_r: int = 0  # 0: fully trained (when trained) or frozen
    lora_targets: object = None
    lora_dropout: float = 0.0
    lora_bytes: int = 4  # PEFT keeps adapters in float32 over a bf16 base (DeepSpeed bf16 casts them to 2)
    trained: bool = True
    seq_cls: bool = False  # a score head (reward model / critic)


def weight_bytes(m: Model) -> float:
    if m.quant_4bit:
        # bitsandbytes quantizes the linears; prepare_model_for_kbit_training casts the rest to float32
        return m.arch.linear_params * BNB_4BIT_BYTES + (m.arch.params - m.arch.linear_params) * 4
    return m.arch.params * m.dtype_bytes


def trainable_params(m: Model) -> int:
    if not m.trained:
        return 0
    if m.lora_r:
        return lora_params(m.arch, m.lora_targets, m.lora_r) + (m.arch.head_params if m.seq_cls else 0)
    return m.arch.params


def adapter_bytes(m: Model) -> float:
    """LoRA parameters (and PEFT's trainable copy of a score head), beyond the base weights."""
    return trainable_params(m) * m.lora_bytes if m.lora_r and m.trained else 0


def training_state_bytes(m: Model, launch: Launch) -> dict:
    """Gradients and optimizer states (AdamW) of the trained parameters: {'gpu': {kind: bytes}, 'cpu': {...}}."""
    n = trainable_params(m)
    if not n:
        return {"gpu": {}, "cpu": {}}
    param_bytes = m.lora_bytes if m.lora_r else m.dtype_bytes
    if not launch.zero_stage:
        # torch AdamW: gradients and both moments in the parameters' dtype
        return {"gpu": {"gradients": n * param_bytes, "optimizer": 2 * n * param_bytes}, "cpu": {}}
    share = n / launch.processes
    states = {"optimizer": share * 12}  # fp32 master copy + 2 fp32 moments, partitioned
    grads = {"gradients": share * 4}  # fp32 gradient partition
    if launch.zero_stage == 1:
        grads = {"gradients": n * 2 + share * 4}  # full bf16 gradients, then the fp32 partition
    if launch.offload_optimizer:
        return {"gpu": {}, "cpu": {**states, **grads}}
    return {"gpu": {**states, **grads}, "cpu": {}}


def optimizer_step_bytes(m: Model, launch: Launch) -> float:
    """Temporaries of AdamW's step where it runs on the GPU: torch's multi-tensor (foreach) step makes one
    temporary as large as the moments (sqrt of the second moment); none when the step runs on the CPU."""
    n = trainable_params(m)
    if launch.zero_stage and launch.offload_optimizer:
        return 0
    if launch.zero_stage:
        return n / launch.processes * 4
    return n * (m.lora_bytes if m.lora_r else m.dtype_bytes)


def deepspeed_bucket_bytes(launch: Launch, trainable: int) -> float:
    """ZeRO-1/2 stage gradients through a contiguous bucket of reduce_bucket_size elements (bf16), allocated in full."""
    if launch.zero_stage in (1, 2):
        return DEEPSPEED_REDUCE_BUCKET * 2 if trainable else 0
    if launch.zero_stage == 3:
        return min(DEEPSPEED_REDUCE_BUCKET, trainable) * 2 * 2  # reduce + prefetch buckets, bounded by the model
    return 0


def layer_activation_bytes(m: Model, tokens: int, act_bytes: int, dropout: float) -> float:
    """Tensors one decoder layer saves for backward, per micro-batch of `tokens` tokens (batch x length).

    Pre-LN layer with SDPA: both norms' inputs and outputs, q, k, v, the attention output and its contiguous copy,
    the MLP's activation output (gated MLPs: gate, up, activation and product), float32 log-sum-exp per head,
    dropout masks; LoRA adds each adapted linear's rank-r intermediate, and a copy of its input when LoRA dropout
    is on (the dropped-out input) or when the adapter's dtype differs from the activations' (PEFT casts the input).
    """
    a = m.arch
    hidden = 6 * a.hidden + 2 * a.kv_dim  # norm in/out x2, q, attention out + copy, k, v
    mlp = 4 * a.ffn if a.gated else a.ffn
    per_token = (hidden + mlp) * act_bytes + a.heads * 4 + 4 * 4  # + log-sum-exp, norm statistics
    if dropout:
        per_token += 2 * a.hidden  # bool masks after attention and MLP
    if m.lora_r and m.trained:
        adapted = lora_targets(a, m.lora_targets)
        per_token += len(adapted) * m.lora_r * act_bytes
        if m.lora_dropout:
            per_token += sum(i for _, i, _ in adapted) * (act_bytes + 1)
        elif m.lora_bytes != act_bytes:
            per_token += sum(i for _, i, _ in adapted) * act_bytes
    return per_token * tokens


def backward_transient_bytes(m: Model, tokens: int, act_bytes: int) -> float:
    """Gradients in flight while one layer runs backward (MLP output/input gradients, hidden-state gradients)."""
    a = m.arch
    return (2 * a.ffn + 3 * a.hidden) * act_bytes * tokens


def forward_transient_bytes(m: Model, tokens: int, act_bytes: int) -> float:
    """Live tensors of one layer's forward without gradients (scoring, evaluation, prefill)."""
    a = m.arch
    return (3 * a.hidden + 2 * a.ffn) * act_bytes * tokens


def training_activations(m: Model, batch: int, length: int, act_bytes: int, checkpointing: bool,
                         dropout: float) -> dict:
    """Saved activations at the top of the forward pass, and the extra peak while the layers run backward."""
    tokens = batch * length
    layer = layer_activation_bytes(m, tokens, act_bytes, dropout)
    embed = 4 * m.arch.hidden * act_bytes * tokens  # embeddings, positions, final norm in/out
    if checkpointing:
        saved = m.arch.layers * m.arch.hidden * act_bytes * tokens + embed
        backward = layer + backward_transient_bytes(m, tokens, act_bytes)  # one layer recomputed
    else:
        saved = m.arch.layers * layer + embed
        backward = backward_transient_bytes(m, tokens, act_bytes)
    return {"saved": saved, "backward": backward}


def sft_logits_bytes(arch: Arch, tokens: int, act_bytes: int, trained_head: bool, device: str = "cuda") -> float:
    """TRL's fused LM head: one tile of logits at a time (its buffer is allocated whole, even for a small
    vocabulary), plus the float32 hidden-state gradient (and head gradient). On a GPU Triton folds each tile in
    place; elsewhere TRL's torch fallback makes about seven float32 temporaries of the tile (its backward)."""
    rows = min(tokens, SFT_LOGPROB_TILE[0])
    tile = rows * SFT_LOGPROB_TILE[1] * act_bytes
    fallback = 7 * rows * min(arch.vocab, SFT_LOGPROB_TILE[1]) * 4 if device != "cuda" else 0
    return tile + fallback + tokens * arch.hidden * 4 + (arch.vocab * arch.hidden * 4 if trained_head else 0)


def ppo_logits_bytes(arch: Arch, batch: int, length: int, response: int, act_bytes: int) -> float:
    """ppo.py's micro-batch: the full logits (model dtype), their response slice in float32 divided by the
    temperature (kept for backward by the log-softmax) and, for the entropy statistic, two more float32 copies."""
    return batch * length * arch.vocab * act_bytes + 3 * batch * response * arch.vocab * 4


def scoring_logits_bytes(arch: Arch, batch: int, length: int, response: int, act_bytes: int) -> float:
    """Scoring without gradients: the logits, and the float32 response slice divided by the temperature."""
    return batch * length * arch.vocab * act_bytes + 2 * batch * response * arch.vocab * 4


def kv_cache_bytes(arch: Arch, batch: int, length: int, act_bytes: int) -> float:
    """Keys and values of every layer for `batch` sequences of `length` tokens (DynamicCache, model dtype)."""
    return 2 * arch.layers * batch * length * arch.kv_dim * act_bytes


def margin_bytes(peak: float) -> float:
    return CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * peak


# ----------------------------------------------------------------------------------------------------------------
# 4. Plans
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the plan depends on, normalised from a step's arguments (see setup_from_args)."""

    step: str
    models: dict  # name -> path of the model(s): sft/reward: {'model': ...}; ppo: {'sft': ..., 'reward': ...}
    launch: Launch
    dtype: str | None = "bfloat16"
    use_peft: bool = False
    lora_r: int = 16
    lora_targets: object = None
    lora_dropout: float = 0.0
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    eval_batch: int = 8
    max_length: int = 512  # sft / reward
    max_prompt_length: int = 256  # ppo
    response_length: int = 256
    generation_batch: int = 8
    other_tokenizer: bool = False  # ppo: the reward model reads other tokens, so the critic starts from the SFT model
    critic_free: bool = False  # ppo: --advantage_estimator rloo / grpo, no critic at all
    device: str = "cuda"  # "cpu": the CPU code paths (for bench/memory_validate.py)


@dataclass
class Line:
    role: str
    kind: str
    gpu: float  # bytes at the peak
    cpu: float = 0.0  # bytes offloaded to CPU memory (not in the GPU total)
    note: str = ""


def _model(setup: Setup, path: str, seq_cls: bool, trained: bool, launch: Launch) -> Model:
    arch = read_arch(path, seq_cls)
    dtype_bytes = arch.dtype_bytes if setup.dtype in (None, "auto") else DTYPE_BYTES.get(setup.dtype, 4)
    if setup.dtype is None:
        dtype_bytes = 4  # transformers loads float32 unless told otherwise
    if launch.zero_stage and launch.bf16 and trained:
        dtype_bytes = 2  # the DeepSpeed engine runs the trained model in bf16
    lora_bytes = 2 if (launch.zero_stage and launch.bf16) else (4 if dtype_bytes < 4 else dtype_bytes)
    return Model(arch=arch, dtype_bytes=dtype_bytes, quant_4bit=setup.load_in_4bit and setup.use_peft,
                 lora_r=setup.lora_r if setup.use_peft else 0, lora_targets=setup.lora_targets,
                 lora_dropout=setup.lora_dropout, lora_bytes=lora_bytes, trained=trained, seq_cls=seq_cls)


def _act_bytes(m: Model, launch: Launch) -> int:
    return 2 if (m.dtype_bytes == 2 or launch.bf16 or m.quant_4bit) else 4


def _static_lines(role: str, m: Model, launch: Launch, weights: bool = True) -> list[Line]:
    lines = []
    if weights:
        kind = "weights (4-bit)" if m.quant_4bit else f"weights ({m.dtype_bytes * 8}-bit)"
        share = launch.processes if (launch.zero_stage == 3 and m.trained) else 1
        gpu = 0 if (launch.offload_param and launch.zero_stage == 3 and m.trained) else weight_bytes(m) / share
        lines.append(Line(role, kind, gpu, weight_bytes(m) - gpu))
    if adapter_bytes(m):
        lines.append(Line(role, f"LoRA r={m.lora_r} ({trainable_params(m) / 1e6:.1f}M)", adapter_bytes(m)))
    state = training_state_bytes(m, launch)
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
    lines.append(Line(role, "DeepSpeed gradient bucket", deepspeed_bucket_bytes(launch, trainable_params(m))))
    e = _act_bytes(m, launch)
    batch = setup.micro_batch * (2 if reward else 1)
    dropout = 0.0 if reward else _config_dropout(m.arch.name)  # RewardTrainer turns dropout off, SFTTrainer doesn't
    acts = training_activations(m, batch, setup.max_length, e, setup.gradient_checkpointing, dropout)
    logits = 0 if reward else sft_logits_bytes(m.arch, batch * setup.max_length, e, not m.lora_r, setup.device)
    eval_tokens = setup.eval_batch * (2 if reward else 1) * setup.max_length
    peak_eval = forward_transient_bytes(m, eval_tokens, e) + (0 if reward else sft_logits_bytes(
        m.arch, eval_tokens, e, False, setup.device) - eval_tokens * m.arch.hidden * 4)
    phases = {"train": acts["saved"] + max(logits, acts["backward"]), "eval": peak_eval,
              "optimizer step": optimizer_step_bytes(m, launch)}
    other = training_activations(m, batch, setup.max_length, e, not setup.gradient_checkpointing, dropout)
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
    config = _config_for(name)
    return float(getattr(config, "dropout", 0.0) or getattr(config, "hidden_dropout", 0.0) or 0.0)


def plan_ppo(setup: Setup) -> tuple[list, dict, list]:
    """ppo.py: actor + reference (the actor with LoRA off), critic + reward model (the critic with LoRA off); with
    a critic-free estimator (critic_free), the reward model alone."""
    launch = setup.launch
    actor = _model(setup, setup.models["sft"], False, True, launch)
    reward = _model(setup, setup.models["reward"], True, False, launch)
    # ppo.build_models: the critic is the reward model under its own LoRA unless --critic_model_path is given or
    # the reward model reads other tokens (then the SFT backbone); without LoRA it is a copy.
    critic_path = setup.models.get("critic") or setup.models["sft" if setup.other_tokenizer else "reward"]
    critic = None if setup.critic_free else _model(setup, critic_path, True, True, launch)
    trained = [m for m in (actor, critic) if m is not None]
    both = "actor + critic" if critic else "actor"
    shared_ref = setup.use_peft
    shared_reward = critic is not None and setup.use_peft and not setup.models.get("critic") and \
        not setup.other_tokenizer
    lines = _static_lines("actor", actor, launch)
    lines.append(Line("reference", "weights: the actor's, LoRA off" if shared_ref else
                      f"weights ({actor.dtype_bytes * 8}-bit), a copy", 0 if shared_ref else weight_bytes(actor),
                      note="shared" if shared_ref else ""))
    if critic:
        lines += _static_lines("critic", critic, launch, weights=not shared_reward)
    lines.append(Line("reward model", f"weights ({reward.dtype_bytes * 8 if not reward.quant_4bit else 4}-bit)" +
                      (", also the critic's (its LoRA off)" if shared_reward else ""), weight_bytes(reward),
                      note="shared" if shared_reward else ""))
    trainable = sum(trainable_params(m) for m in trained)
    lines.append(Line(both, "DeepSpeed gradient bucket", deepspeed_bucket_bytes(launch, trainable)))

    e = _act_bytes(actor, launch)
    b, length, r = setup.micro_batch, setup.max_prompt_length + setup.response_length, setup.response_length
    g = setup.generation_batch
    no_activations = {"saved": 0, "backward": 0}
    actor_acts = training_activations(actor, b, length, e, setup.gradient_checkpointing, 0.0)
    critic_acts = training_activations(critic, b, length, e, setup.gradient_checkpointing, 0.0) if critic else \
        no_activations
    logits = ppo_logits_bytes(actor.arch, b, length, r, e)
    backward = max(actor_acts["backward"], critic_acts["backward"])
    peak_train = actor_acts["saved"] + critic_acts["saved"] + max(logits, backward)
    kv = kv_cache_bytes(actor.arch, g, length, e)
    peak_generate = kv + forward_transient_bytes(actor, g * setup.max_prompt_length, e) + g * actor.arch.vocab * 8
    peak_score = max(scoring_logits_bytes(actor.arch, g, length, r, e) + forward_transient_bytes(actor, g * length, e),
                     forward_transient_bytes(critic or reward, g * length, e))
    phases = {"train": peak_train, "generate": peak_generate, "score": peak_score,
              "optimizer step": sum(optimizer_step_bytes(m, launch) for m in trained)}
    checkpointed = setup.gradient_checkpointing
    other = [training_activations(m, b, length, e, not checkpointed, 0.0)["saved"] for m in trained]
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
        roles = [(role, b) for role, b in self.by_role().items() if b >= 0.005 * GIB]
        parts = " + ".join(f"{role} {b / GIB:.2f}" for role, b in roles)
        return (f"memory estimate: {self.total / GIB:.2f} GiB peak per GPU = {parts} + margin {self.margin / GIB:.2f} "
                f"GiB ({self.setup.launch.describe()}; peak in {max(self.phases, key=self.phases.get)}; "
                f"python bench/memory.py for the table)")


def make_plan(setup: Setup) -> Plan:
    lines, phases, details = plan_ppo(setup) if setup.step == "ppo" else plan_trainer_step(setup)
    lines = [line for line in lines if line.gpu or line.cpu or line.note]
    allocated = sum(line.gpu for line in lines)
    margin = margin_bytes(allocated)
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


def setup_from_args(step: str, args, model_args, launch: Launch, same_tokenizer: bool = True) -> Setup:
    """The Setup of a step from its parsed arguments (sft/reward: TRL's SFTConfig / RewardConfig; ppo: PPOArguments)
    and TRL's ModelConfig."""
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
    return Setup(step=step, models={"model": model_args.model_name_or_path}, eval_batch=args.per_device_eval_batch_size,
                 max_length=args.max_length or 1024, **common)


# ----------------------------------------------------------------------------------------------------------------
# 5. The line each step prints at start
# ----------------------------------------------------------------------------------------------------------------
def common_describe(error: Exception) -> str:
    import common

    return str(error).splitlines()[0][:400] if isinstance(error, PlanError) else common.describe(error)


def visible_gpu_bytes() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def log_estimate(step: str, args, model_args, same_tokenizer: bool = True) -> Plan | None:
    """Log the step's memory estimate as one line (a warning when it exceeds the visible GPU); never raises."""
    try:
        plan = make_plan(setup_from_args(step, args, model_args, launch_from_env(), same_tokenizer))
    except Exception as error:  # the estimate must never stop a run
        logger.info(f"memory estimate: unavailable ({common_describe(error)})")
        return None
    gpu = visible_gpu_bytes()
    if gpu is not None and not plan.fits(gpu):
        logger.warning(f"{plan.one_line()}: more than this GPU's {gpu / GIB:.1f} GiB; see python bench/memory.py "
                       f"--config ... for the knobs that make it fit")
    else:
        logger.info(plan.one_line() + ("" if gpu else "; no GPU here"))
    return plan
