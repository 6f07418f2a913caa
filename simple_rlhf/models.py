"""Models and tokenizers: locations, loading (adapters merged, 4-bit), the tiny demo model, dropout switches."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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


def adapter_task_or_config(path: str, flag: str):
    """What a check of a model's kind reads, before anything is loaded: ("adapter", its PEFT task_type or None) for
    an adapter folder, else ("model", its transformers config)."""
    from transformers import AutoConfig

    adapter_file = Path(path) / "adapter_config.json"
    if adapter_file.exists():
        return "adapter", json.loads(adapter_file.read_text()).get("task_type")
    try:
        return "model", AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: could not read its config ({describe(error)}); check the path or hub id")


def require_causal_lm(path: str, flag: str) -> None:
    """A policy (sft.py's start, ppo.py's --sft_model_path, evaluate.py's and chat.py's policies) must be a causal
    language model. A sequence classifier (a reward model) or a SEQ_CLS adapter would load as a causal LM with an
    untrained or tied head and then train or answer silently: refuse it, before anything is loaded."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind, found = adapter_task_or_config(path, flag)
    if kind == "adapter":
        if found not in (None, "CAUSAL_LM"):
            raise UserError(f"{flag} {path}: a {found} adapter, not a causal language model; give the output of "
                            "sft.py or ppo.py")
        return
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in (names if isinstance(names, (list, tuple)) else [names])}
    architectures = found.architectures or []  # a config without them (some hub configs) cannot be judged here
    if architectures and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UserError(f"{flag} {path}: not a causal language model (architectures {architectures}); give the "
                        "output of sft.py or ppo.py, or another causal LM")


def check_reward_model(path: str, flag: str) -> None:
    """The reward model must be a sequence classifier with one label (or a SEQ_CLS adapter); say so before loading."""
    kind, found = adapter_task_or_config(path, flag)
    if kind == "adapter":
        if found != "SEQ_CLS":
            raise UserError(f"{flag} {path}: this adapter is not a sequence classifier (task_type is not SEQ_CLS); "
                            "give the output of reward.py")
        return
    architectures = found.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or found.num_labels != 1:
        raise UserError(f"{flag} {path}: not a sequence classifier with one label (architectures {architectures}, "
                        f"num_labels {found.num_labels}); give the output of reward.py")


def check_model_flags(model_args) -> None:
    """Reject flag combinations that cannot work, before anything is loaded or written."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        bits = 4 if model_args.load_in_4bit else 8
        raise UserError(f"--load_in_{bits}bit needs --use_peft: a quantized base cannot be trained, only LoRA "
                        "adapters on top of it (QLoRA)")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit: choose one")
    targets = model_args.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # TRL turns a one-name list into a string, which PEFT reads as a pattern of the whole module name (matching
        # no `model.layers.0.q_proj` for `q_proj`). Listed twice it stays a list, which PEFT matches on the name's
        # end, as it does for two names or more; the list survives TRL re-creating the config (dataclasses.replace).
        model_args.lora_target_modules = [targets, targets]


def module_names(path: str, sequence_classifier: bool = False) -> dict[str, str] | None:
    """The module names (and class names) of the model at `path` (an adapter folder: of its base, as load_merged
    merges it), built from its config on the meta device, without weights; None when its config cannot be read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    while adapter_base(path) is not None:
        path = adapter_base(path)
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            auto_class = AutoModelForSequenceClassification if sequence_classifier else AutoModelForCausalLM
            model = auto_class.from_config(config)
    except Exception:  # the model's own loading reports it, with its message
        return None
    return {name: type(module).__name__ for name, module in model.named_modules()}


def check_lora_targets(model_args, path: str, flag: str, sequence_classifier: bool = False) -> None:
    """With --use_peft, every name of --lora_target_modules must match a module of the model at `path` (as PEFT
    matches: the name's end for a list, the whole name for a pattern), checked before anything is trained: PEFT
    fails with a traceback when none matches, and silently adapts fewer layers when some name is a typo."""
    targets = model_args.lora_target_modules
    if not model_args.use_peft or targets in (None, "all-linear") or list(targets) == ["all-linear"]:
        return
    names = module_names(path, sequence_classifier)
    if names is None:
        return
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
    else:
        unmatched = [t for t in dict.fromkeys(targets) if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = dict.fromkeys(name.split(".")[-1] for name, kind in names.items() if kind in ("Linear", "Conv1D"))
        raise UserError(f"--lora_target_modules {' '.join(unmatched)}: no module of {flag} {path} matches (its "
                        f"linear layers: {', '.join(list(linear)[:8])}); name some of those, or use all-linear")


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
    except DamagedWeights as error:
        raise UserError(f"{flag} {path}: {error}")
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
        with damaged_weights_named(path):
            return auto_class.from_pretrained(path, **options)
    model = load_merged(auto_class, base, options)
    # The adapter may be for another head (an SFT adapter onto a sequence classifier): load it task-free,
    # which matches on the shared backbone's module names.
    adapter_config = PeftConfig.from_pretrained(path)
    adapter_config.task_type = None
    with damaged_weights_named(path):
        model = PeftModel.from_pretrained(model, path, config=adapter_config).merge_and_unload()
    model.name_or_path = str(Path(path).expanduser().resolve())  # read by PEFT's get_peft_model
    return model


class DamagedWeights(UserError):
    """A weights file that cannot be read completely (cut short by a full disk, a killed copy or download)."""


def damaged_weights_file(folder: str) -> tuple[Path, str] | None:
    """(file, why) for the first weights file in `folder` that cannot be read completely: a safetensors file whose
    header or data is cut short (safe_open checks both), or a torch .bin that is no complete zip archive."""
    import zipfile

    from safetensors import safe_open

    if not Path(folder).is_dir():
        return None
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as error:
            return file, describe(error)
    for file in sorted(Path(folder).glob("*.bin")):
        if not zipfile.is_zipfile(file):
            return file, "not a complete torch archive"
    return None


@contextlib.contextmanager
def damaged_weights_named(folder: str):
    """Turn a failed load into one line naming the damaged weights file, when there is one: safetensors says only
    `header too small` and torch `failed finding central directory`, with no file named."""
    try:
        yield
    except Exception:
        damaged = damaged_weights_file(folder)
        if damaged is None:
            raise
        file, why = damaged
        raise DamagedWeights(f"{file} is damaged ({file.stat().st_size} bytes; {why}): it was cut short or not "
                             "written completely; copy or save that model again") from None


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
