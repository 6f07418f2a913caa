"""Memory arithmetic: the launch, the architecture, and the bytes of weights, optimizer states and activations."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from simple_rlhf import models

logger = logging.getLogger("simple_rlhf")


GIB = 2**30


SHARED_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "model-configs"


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); accelerate leaves it


SFT_LOGPROB_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary per tile (kernels/chunked_logprob.py)


CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces: outside torch's allocator, GPU-only


FRAGMENTATION = 0.10  # caching-allocator slack over the peak of live tensors: GPU-only


BNB_4BIT_BYTES = 0.5 + 4 / 64  # NF4: half a byte per weight + one float32 absmax per block of 64


class PlanError(Exception):
    """The plan cannot be made (e.g. a model's config is not available offline): one line for the user."""


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

    if name == models.BUILTIN_MODEL or Path(name).expanduser().exists():
        path = models.resolve_model_path(name)
        base = models.adapter_base(path)
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
