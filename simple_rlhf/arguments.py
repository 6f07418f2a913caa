"""Command-line arguments: TRL's parser with YAML --config, one-line errors, ranges, checks before loading."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from simple_rlhf.errors import UserError, describe, exit_on_user_error
from simple_rlhf import data, models, synthetic

def parse_args(dataclass_types, argv=None):
    """Parse dataclasses TRL's way (flags, or a YAML `--config` that flags override) and validate every value; a
    mistake is one `error:` line and exit code 2, before anything is written. See `validate_args`."""
    return exit_on_user_error(validate_args)(dataclass_types, argv)


def validate_args(dataclass_types, argv=None, check_paths: bool = True) -> tuple:
    """Parse and check, raising UserError: the config file (exists, valid YAML, a mapping, known keys), the flags
    (known, well-typed: argparse), the libraries' own checks (one line), every number against RANGES, and, with
    `check_paths`, that output_dir can be written and that model and data locations exist (see check_locations).

    Without a GPU, transformers refuses bf16 unless the arguments say `use_cpu`; it is added where a dataclass has
    it, so that the same recipe runs on a laptop, in CI and on a GPU machine.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any("use_cpu" in getattr(cls, "__dataclass_fields__", {}) for cls in dataclass_types) and \
            not any(arg.startswith("--use_cpu") for arg in argv):
        import torch

        if not torch.cuda.is_available():
            argv += ["--use_cpu", "true"]
    if default_bf16_off(dataclass_types, argv):
        argv += ["--bf16", "false"]
    parser = make_parser(dataclass_types)
    known = {action.dest for action in parser._actions if action.dest != "help"}
    if "--config" in argv:
        check_config_file(argv, known)
    try:
        *parsed, _, unknown = parser.parse_args_and_config(args=argv, return_remaining_strings=True,
                                                           separate_remaining_strings=True)
    except (ValueError, TypeError) as error:  # a dataclass's __post_init__ (transformers' own checks)
        raise UserError(" ".join(str(error).split())[:500] or describe(error))
    if unknown:
        flag = next((arg for arg in unknown if arg.startswith("-")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if not flag.startswith("-"):
            raise UserError(f"unexpected argument {flag!r}; options are written --name value")
        raise UserError(f"unknown option --{name}{closest(name, known, '; did you mean --{}?')}")
    check_ranges(parsed)
    for args in parsed:
        if isinstance(args, data.DataArguments):
            check_data_arguments(args)
        if getattr(args, "output_dir", None):
            check_output_writable(args.output_dir, "--output_dir")
        if check_paths:
            check_locations(args)
    return tuple(parsed)


def check_data_arguments(data_args: data.DataArguments) -> None:
    """The data options that are wrong whatever the data: a malformed --data_split, evaluating on training rows."""
    data.parse_data_split(data_args.data_split)
    if data_args.dataset_test_split == data_args.dataset_train_split:
        raise UserError(f"--dataset_test_split {data_args.dataset_test_split} is the training split: evaluation would "
                        "score rows the model trained on; name the test split, or a missing one to hold out "
                        "--eval_fraction of the training rows")


def closest(name: str, candidates, template: str) -> str:
    """`template` filled with the candidate nearest to `name` (difflib), or '' when none is near."""
    import difflib

    # A name that extends or shortens a real one (lora_rank, learning_r) means that one; else the nearest by difflib.
    prefixed = [c for c in candidates if len(c) > 2 and (name.startswith(c) or c.startswith(name))]
    match = sorted(prefixed, key=lambda c: abs(len(c) - len(name)))[:1] or \
        difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return template.format(match[0]) if match else ""


def make_parser(dataclass_types):
    """TrlParser whose argparse errors (bad type, bad choice, missing value) are one UserError line, not a usage
    screen and exit."""
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def error(self, message):
            raise UserError(message)

    return OneLineParser(dataclass_types)


def check_config_file(argv: list[str], known: set[str]) -> None:
    """The `--config` YAML exists, parses, is a mapping, and names only known options (TRL would raise a
    FileNotFoundError, a yaml traceback, or list the unknown keys without a hint)."""
    import yaml

    index = argv.index("--config")
    # `--config` last, or followed by a flag: also the --use_cpu / --bf16 that validate_args appends
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise UserError("--config needs a YAML file, e.g. --config recipes/demo/sft.yaml")
    path = Path(argv[index + 1])
    if not path.is_file():
        raise UserError(f"--config {path}: no such file" + ("" if not path.is_dir() else " (it is a folder)"))
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise UserError(f"--config {path}: not valid YAML ({where}: {getattr(error, 'problem', None) or error}); "
                        "fix the file")
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: not a mapping of option: value (it holds a {type(config).__name__}); write "
                        "one `option: value` per line")
    for key in config:
        if key != "env" and key not in known:
            raise UserError(f"--config {path}: unknown key {key!r}{closest(str(key), known, '; did you mean {!r}?')}")


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: an interval, plus special values outside it (`also`, e.g. -1 for
    "not set"), and why, when the reason is not obvious (`hint`)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    hint: str = ""

    def allows(self, value) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            text = f"> {low}" if self.low_open else f"at least {low}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        text = " or ".join([*map(_number, self.also), text])
        return f"{text} ({self.hint})" if self.hint else text


def _number(value: float) -> str:
    return str(int(value)) if value not in (math.inf, -math.inf) and float(value).is_integer() else f"{value:g}"


AT_LEAST_1, POSITIVE, NON_NEGATIVE = Range(1), Range(0, low_open=True), Range(0)


SEED = Range(0, 2**32 - 1)  # numpy's seeds


# Every numeric option of every script (sft.py, reward.py, ppo.py, train.py, evaluate.py, chat.py), by field name;
# `Class.field` where a class gives the name another meaning. Checked by check_ranges when the field is present.
RANGES = {
    # data (DataArguments)
    "data_seed_for_split": SEED, "eval_fraction": Range(0, 1, True, True), "max_train_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    # batches, lengths, counts
    "per_device_train_batch_size": AT_LEAST_1, "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "eval_accumulation_steps": AT_LEAST_1, "max_length": AT_LEAST_1,
    "max_prompt_length": AT_LEAST_1, "response_length": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
    "max_prompts": AT_LEAST_1, "held_out_pairs": AT_LEAST_1, "batch_size": AT_LEAST_1, "generation_batch_size": AT_LEAST_1,
    "ptx_batch_size": AT_LEAST_1, "ptx_max_length": AT_LEAST_1, "show": NON_NEGATIVE, "num_samples": NON_NEGATIVE,
    "best_of_n": NON_NEGATIVE,
    "pad_to_multiple_of": AT_LEAST_1, "dataset_num_proc": AT_LEAST_1, "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_1,
    # schedule (transformers: max_steps -1 means "use num_train_epochs"; a *_steps below 1 is a fraction of the run)
    "num_train_epochs": POSITIVE, "max_steps": Range(1, also=(-1,)), "PPOArguments.max_steps": AT_LEAST_1,
    "total_episodes": AT_LEAST_1, "num_ppo_epochs": AT_LEAST_1, "num_mini_batches": AT_LEAST_1,
    "warmup_steps": NON_NEGATIVE, "warmup_ratio": Range(0, 1), "logging_steps": POSITIVE, "eval_steps": POSITIVE,
    "save_steps": POSITIVE, "PPOArguments.save_steps": AT_LEAST_1, "save_total_limit": NON_NEGATIVE,
    "eval_delay": NON_NEGATIVE, "torch_empty_cache_steps": AT_LEAST_1, "sample_every": NON_NEGATIVE,
    "kl_horizon": AT_LEAST_1,
    # optimisation (transformers: max_grad_norm 0 turns clipping off; ppo.py clips to it, so 0 would zero every step)
    "learning_rate": POSITIVE, "critic_learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(0, 1, high_open=True), "adam_beta2": Range(0, 1, high_open=True), "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE, "PPOArguments.max_grad_norm": POSITIVE,
    "label_smoothing_factor": Range(0, 1, high_open=True), "neftune_noise_alpha": POSITIVE,
    "center_rewards_coefficient": NON_NEGATIVE, "router_aux_loss_coef": NON_NEGATIVE,
    # LoRA (alpha 0 scales the adapter to nothing)
    "lora_r": AT_LEAST_1, "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, high_open=True),
    # sampling (chat.py: any temperature with --greedy true; chat.main asks for > 0 when it samples)
    "temperature": POSITIVE, "ChatArguments.temperature": NON_NEGATIVE, "top_k": NON_NEGATIVE, "top_p": Range(0, 1, low_open=True), "repetition_penalty": POSITIVE,
    # PPO
    "kl_coef": NON_NEGATIVE, "kl_budget": NON_NEGATIVE, "target_kl": POSITIVE, "cliprange": POSITIVE,
    "cliprange_value": POSITIVE,
    "vf_coef": POSITIVE, "entropy_coef": NON_NEGATIVE, "gamma": Range(0, 1), "lam": Range(0, 1),
    "missing_eos_penalty": NON_NEGATIVE, "ema_decay": Range(0, 1, high_open=True), "ptx_coef": NON_NEGATIVE,
    "max_kl": POSITIVE, "num_generations": AT_LEAST_1, "num_samples_per_prompt": AT_LEAST_1,
    "score_clip": Range(0, low_open=True, hint="0 makes every score 0; leave it unset for no clipping"),
    # seeds and distribution
    "seed": SEED, "data_seed": SEED, "local_rank": Range(-1), "ddp_timeout": AT_LEAST_1,
    "ddp_bucket_cap_mb": AT_LEAST_1,
}


# Numeric fields deliberately not in RANGES, and why.
UNCHECKED_NUMBERS = {
    "steps": "train.py --steps: checked by train.validate (a list of step numbers)",
}


def range_of(class_name: str, field_name: str) -> Range | None:
    return RANGES.get(f"{class_name}.{field_name}", RANGES.get(field_name))


def check_ranges(parsed) -> None:
    """Every field of the parsed dataclasses that RANGES names holds a number in its range (None means unset)."""
    import dataclasses
    import typing

    for args in parsed:
        hints = typing.get_type_hints(type(args))
        for field_info in dataclasses.fields(args):
            allowed = range_of(type(args).__name__, field_info.name)
            value = getattr(args, field_info.name)
            if allowed is None or value is None:
                continue
            flag = f"--{field_info.name} {value}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{flag}: must be a number, {allowed}")
            whole = "int" in str(hints.get(field_info.name)) and "float" not in str(hints.get(field_info.name))
            if whole and value != int(value):
                raise UserError(f"{flag}: must be a whole number, {allowed}")
            if not allowed.allows(value):
                raise UserError(f"{flag}: must be {allowed}")


def check_output_writable(output_dir: str | Path, flag: str = "--output_dir") -> None:
    """output_dir is (or can be made as) a folder we can write in: checked by creating and removing a probe file in
    it or in its nearest existing parent, so that a run never trains for hours and then fails at its first save."""
    import tempfile

    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {output_dir}: is a file, not a folder; give a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {output_dir}: {existing} is a file, so the folder cannot be made; give another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise UserError(f"{flag} {output_dir}: cannot write in {existing} ({error.strerror or error}); choose a "
                        "folder you can write to")


MODEL_FIELDS = ("model_name_or_path", "sft_model_path", "reward_model_path", "critic_model_path", "model_path")


DATASET_FIELDS = ("dataset_name", "ptx_dataset_name")


def check_locations(args, skip=()) -> None:
    """Model and data locations named by a parsed dataclass exist (local paths) or may be hub ids; nothing loaded.
    `skip`: flags not to check (train.py: the outputs of steps that have not run yet)."""
    for name in MODEL_FIELDS:
        value = getattr(args, name, None)
        if value and value != models.BUILTIN_MODEL and f"--{name}" not in skip and \
                not (name == "reward_model_path" and str(value).lower() == "none"):  # ppo.py: reward functions alone
            models.check_model_location(value, f"--{name}")
    for name in DATASET_FIELDS:
        value = getattr(args, name, None)
        if f"--{name}" in skip:
            continue
        if value and value != synthetic.BUILTIN_DATASET:
            data.check_dataset_location(value, f"--{name}")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere PyTorch emulates bf16 matmuls,
    measured 4x slower than float32 on an AVX2 CPU, and a bf16-autocast training step 10x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_bf16_off(dataclass_types, argv: list[str]) -> bool:
    """TRL's SFTConfig and RewardConfig turn bf16 on by default. On a GPU keep that; on a CPU turn it off unless the
    flags, the --config YAML or an accelerate/DeepSpeed launch ask for it: emulated bf16 (CPUs without AVX512-BF16 or
    AMX) is ~10x slower, and float32 on every CPU gives the same numbers on every CPU (the demo, the tests)."""
    import torch

    if torch.cuda.is_available():
        return False
    if not any("bf16" in getattr(cls, "__dataclass_fields__", {}) for cls in dataclass_types):
        return False
    if any(arg.startswith("--bf16") for arg in argv) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return False
    # A 4/8-bit model computes in bf16: its float32 heads need bf16 autocast to meet it.
    if any(arg.startswith(("--load_in_4bit", "--load_in_8bit")) for arg in argv):
        return False
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        try:
            config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
        except (OSError, yaml.YAMLError):
            return False  # the parser reports the config file itself
        if isinstance(config, dict) and ({"bf16", "load_in_4bit", "load_in_8bit"} & set(config)):
            return False
    return True
