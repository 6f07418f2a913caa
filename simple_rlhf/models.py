"""Models and tokenizers: locations, loading (adapters merged, 4-bit), the tiny demo model, dropout switches."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from simple_rlhf.errors import UserError, describe
from simple_rlhf import data, synthetic

logger = logging.getLogger("simple_rlhf")


BUILTIN_MODEL = "builtin:tiny-opt"


def cache_dir() -> Path:
    """Where built-in models are built once and kept (SIMPLE_RLHF_CACHE, else ~/.cache/simple-rlhf)."""
    return Path(os.environ.get("SIMPLE_RLHF_CACHE", Path.home() / ".cache" / "simple-rlhf"))


def build_tiny_opt(path: Path) -> None:
    """Build the demo model: a byte-level BPE trained on the synthetic data and a 2-layer OPT, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in synthetic.synthetic_preference_rows(2000, synthetic.SYNTHETIC_SEEDS["tokenizer"])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<pad>", "</s>", "<unk>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=640, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="</s>", eos_token="</s>", unk_token="<unk>"
    )
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=2, ffn_dim=512,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dropout=0.1,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    # Build beside the target and rename, so a crash or a concurrent process never sees a half-built model.
    partial = Path(f"{path}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(path)
    except OSError:  # another process built it first; both are the same, deterministically
        shutil.rmtree(partial, ignore_errors=True)


def check_model_location(name: str | None, flag: str = "--model_name_or_path") -> None:
    """A model location is given and, when it is a local path, a folder holding a model or an adapter."""
    if not name:
        raise UserError(f"{flag} is required")
    if name != BUILTIN_MODEL and data.looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"{flag} {name}: no such folder; give a model folder, a hub id or {BUILTIN_MODEL}")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{flag} {name}: the folder has neither config.json nor adapter_config.json; point at a "
                            "saved model or adapter (e.g. the output_dir of sft.py)")


def resolve_model_path(name: str | None, flag: str = "--model_name_or_path") -> str:
    """A loadable model location: the built-in demo model (built on first use), a local folder, or a hub id."""
    check_model_location(name, flag)
    if name == BUILTIN_MODEL:
        path = cache_dir() / "tiny-opt-v2"  # v2: the tokenizer of the v2 synthetic data
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info(f"building the demo model {BUILTIN_MODEL} in {path}")
            build_tiny_opt(path)
        return str(path)
    return str(Path(name).expanduser()) if data.looks_like_local_path(name) else name


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder, or None when `path` is not one."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.exists():
        return None
    return json.loads(config_file.read_text())["base_model_name_or_path"]


def require_causal_lm(path: str, flag: str) -> None:
    """A policy (sft.py's start, ppo.py's --sft_model_path, evaluate.py's and chat.py's policies) must be a causal
    language model. A sequence classifier (a reward model) or a SEQ_CLS adapter would load as a causal LM with an
    untrained or tied head and then train or answer silently: refuse it, before anything is loaded."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    adapter_file = Path(path) / "adapter_config.json"
    if adapter_file.exists():
        task = json.loads(adapter_file.read_text()).get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise UserError(f"{flag} {path}: a {task} adapter, not a causal language model; give the output of "
                            "sft.py or ppo.py")
        return
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: could not read its config ({describe(error)}); check the path or hub id")
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in (names if isinstance(names, (list, tuple)) else [names])}
    architectures = config.architectures or []  # a config without them (some hub configs) cannot be judged here
    if architectures and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UserError(f"{flag} {path}: not a causal language model (architectures {architectures}); give the "
                        "output of sft.py or ppo.py, or another causal LM")


def check_model_flags(model_args) -> None:
    """Reject flag combinations that cannot work, before anything is loaded or written."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        bits = 4 if model_args.load_in_4bit else 8
        raise UserError(f"--load_in_{bits}bit needs --use_peft: a quantized base cannot be trained, only LoRA "
                        "adapters on top of it (QLoRA)")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit: choose one")


def torch_dtype(name: str | None):
    import torch

    return name if name in (None, "auto") else getattr(torch, name)


def load_model(model_args, auto_class, path: str | None = None, flag: str = "--model_name_or_path", **kwargs):
    """Load a model of `auto_class` from a folder, hub id, built-in name, or PEFT adapter (merged into its base).

    An adapter from sft.py thus feeds reward.py and ppo.py directly: its LoRA weights are merged into the base,
    which works for a sequence classifier too, since the backbone's module names are the same.
    """
    import torch
    from accelerate import PartialState
    from trl import get_quantization_config

    path = resolve_model_path(path or model_args.model_name_or_path, flag)
    quantization = get_quantization_config(model_args)
    options = dict(revision=model_args.model_revision, dtype=torch_dtype(model_args.dtype),
                   attn_implementation=model_args.attn_implementation, quantization_config=quantization,
                   device_map=({"": PartialState().local_process_index} if quantization is not None and torch.cuda.is_available() else None), **kwargs)
    try:
        return load_merged(auto_class, path, options)
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: could not load a model ({describe(error)}); check the path "
                        "or hub id, or pre-download it (see README, Offline)")


def load_merged(auto_class, path: str, options: dict):
    """`auto_class.from_pretrained(path)`, where an adapter folder is merged into its base, itself loaded this way:
    a reward LoRA trained on an SFT adapter thus comes back on the SFT policy it was trained on, not on the raw base.
    The merged model is named after the adapter folder, so that adapters trained on it record that folder as base."""
    from peft import PeftConfig, PeftModel

    base = adapter_base(path)
    if base is None:
        return auto_class.from_pretrained(path, **options)
    model = load_merged(auto_class, base, options)
    # The adapter may be for another head (an SFT adapter onto a sequence classifier): load it task-free,
    # which matches on the shared backbone's module names.
    adapter_config = PeftConfig.from_pretrained(path)
    adapter_config.task_type = None
    model = PeftModel.from_pretrained(model, path, config=adapter_config).merge_and_unload()
    model.name_or_path = str(Path(path).expanduser().resolve())  # read by PEFT's get_peft_model
    return model


def load_tokenizer(path: str, padding_side: str = "right"):
    """The tokenizer saved with a model or adapter; a pad token is set (to EOS) when the tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: could not load its tokenizer ({describe(error)})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "hidden_dropout",
                      "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def disable_dropout(model) -> list[tuple]:
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
