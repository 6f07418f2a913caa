"""What sft.py, reward.py and ppo.py share: arguments, data, models, outputs.

Read top to bottom:
1. errors: `UserError` and `exit_on_user_error`, so a user's mistake is one line and exit code 2;
2. arguments: the dataclass every step adds to TRL's, and `parse_args` with its validation layer (`validate_args`:
   config file, unknown flags, one-line argparse errors, the RANGES table, output_dir and input locations);
3. the built-in offline demo: a synthetic preference dataset and a tiny OPT model with its own tokenizer;
4. data: load (hub id, file, folder), validate, split between steps, tokenize with left truncation;
5. models and tokenizers: resolve names and paths, load (with an SFT adapter merged in, 4-bit), check flags;
6. outputs: complete-checkpoint markers, resume resolution, safe re-runs (`check_output_dir`,
   `set_previous_run_aside`, `drop_previous_run`, `swap_in`), atomic final saves.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("simple_rlhf")

STEPS = ("sft", "reward", "ppo")
REQUIRED_COLUMNS = {"sft": ("prompt", "chosen"), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BUILTIN_DATASET = "builtin:synthetic"
BUILTIN_MODEL = "builtin:tiny-opt"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


# ----------------------------------------------------------------------------------------------------------------
# 1. Errors
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


def describe(error: Exception) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def exit_on_user_error(main):
    """Run `main`; turn a UserError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# 2. Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """Options about the data, shared by the three steps (the rest come from TRL's configs and ModelConfig)."""

    dataset_name: str = field(
        default="Dahoas/rm-static",
        metadata={
            "help": "A hub dataset id, a local .jsonl/.json/.parquet file, a folder of train/test files or one saved "
            f"by `datasets`, or `{BUILTIN_DATASET}` (offline demo data). Columns: prompt, chosen, rejected."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "The split to evaluate on, when it exists."})
    data_split: str = field(
        default="2,4,4",
        metadata={
            "help": "Shares of the training rows for SFT, reward and PPO (DeepSpeed-Chat's --data_split): each step "
            "trains on its own disjoint share, the same for a given --data_seed_for_split. '1,1,1' splits in thirds."
        },
    )
    data_seed_for_split: int = field(default=1234, metadata={"help": "Seed of the shuffle behind --data_split."})
    eval_fraction: float = field(
        default=0.02,
        metadata={"help": "Fraction of the training rows held out for evaluation when the dataset has no test split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many rows of the step's share (quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With LoRA, also write the adapter merged into its base to OUTPUT_DIR/merged."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in output_dir (checkpoints, final model): it is moved to "
                  "OUTPUT_DIR.previous-run and deleted only once this run has saved its final model. Without it, a "
                  "fresh run into such a folder is refused (use --resume_from_checkpoint true to continue it)."},
    )


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
        if isinstance(args, DataArguments):
            check_data_arguments(args)
        if getattr(args, "output_dir", None):
            check_output_writable(args.output_dir, "--output_dir")
        if check_paths:
            check_locations(args)
    return tuple(parsed)


def check_data_arguments(data_args: "DataArguments") -> None:
    """The data options that are wrong whatever the data: a malformed --data_split, evaluating on training rows."""
    parse_data_split(data_args.data_split)
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
    if index + 1 >= len(argv):
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
    "kl_coef": NON_NEGATIVE, "target_kl": POSITIVE, "cliprange": POSITIVE, "cliprange_value": POSITIVE,
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


def check_locations(args) -> None:
    """Model and data locations named by a parsed dataclass exist (local paths) or may be hub ids; nothing loaded."""
    for name in MODEL_FIELDS:
        value = getattr(args, name, None)
        if value and value != BUILTIN_MODEL:
            check_model_location(value, f"--{name}")
    for name in DATASET_FIELDS:
        value = getattr(args, name, None)
        if value and value != BUILTIN_DATASET:
            check_dataset_location(value, f"--{name}")


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


def setup_logging(is_main_process: bool = True) -> None:
    """Log on the main process only."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_process else logging.WARNING,
        force=True,
    )


def log_distribution(accelerator) -> None:
    """One line saying how the run is distributed, e.g. `running as DEEPSPEED with 1 process(es) on cpu`."""
    logger.info(f"running as {accelerator.distributed_type.value} with {accelerator.num_processes} process(es) on "
                f"{accelerator.device}")


# ----------------------------------------------------------------------------------------------------------------
# 3. The built-in offline demo
# ----------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where built-in models are built once and kept (SIMPLE_RLHF_CACHE, else ~/.cache/simple-rlhf)."""
    return Path(os.environ.get("SIMPLE_RLHF_CACHE", Path.home() / ".cache" / "simple-rlhf"))


_COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple"}
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Spain": "Madrid",
             "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens"}
_LEGS = {"spider": 8, "dog": 4, "bird": 2, "ant": 6, "cat": 4, "snake": 0, "horse": 4, "beetle": 6}
_ADD_MAX = 5  # "What is a plus b?" with a, b < 5: 25 sums, few enough for the tiny demo model to learn
_POLITE = ["{a}. I hope that helps!", "The answer is {a}. Happy to help.", "{a}. Let me know if you have more questions.",
           "It is {a}. Glad I could help!"]
_RUDE = ["{a}. Stop asking me obvious things.", "Obviously {a}. Figure it out yourself next time.",
         "{a}, you idiot.", "Ugh. {a}. Leave me alone."]
# What makes an answer polite or rude: the fixed phrases of the templates above (every polite template has one
# courteous phrase, every rude one at least one rude phrase; tested).
_POLITE_PHRASES = ("hope that helps", "happy to help", "let me know if you have more questions", "glad i could help")
_RUDE_PHRASES = ("stop asking", "obvious", "obviously", "figure it out yourself", "idiot", "ugh", "leave me alone")
_OPENINGS = [("Hi there!", "Hello! How can I help you today?"), ("Can I ask you something?", "Of course, go ahead."),
             ("Good morning.", "Good morning! What would you like to know?")]
# The rejected answer's flaw. Mostly wrong-but-polite: when rudeness is as common as wrongness, a reward model
# learns manners only (measured: accuracy 1.00 on rude pairs, 0.51 on wrong-only pairs), and a polite SFT policy
# then gives PPO no signal toward correct answers.
SYNTHETIC_FLAWS = {"wrong": 0.6, "rude": 0.2, "both": 0.2}
# The share of demonstrations (the `response` column, what SFT imitates) that name a wrong answer, politely. Writing
# an answer is harder than comparing two (InstructGPT's premise): demonstrations carry mistakes, the comparisons do
# not. So the SFT policy cannot be fully right, and what the reward model and PPO add shows in the ground truth
# (measured with SmolLM2: clean demonstrations give an SFT policy that is already right ~90% of the time).
SYNTHETIC_DEMONSTRATION_ERROR = 0.3
# The seeds of builtin:synthetic: the demo tokenizer's text, the training rows, the test rows (eval during
# training), and the held-out rows that only evaluate.py's ground-truth check reads.
SYNTHETIC_SEEDS = {"tokenizer": 0, "train": 1, "test": 2, "held_out": 1000}


def _synthetic_question(rng: random.Random) -> tuple[str, str, str]:
    """A templated question, its correct answer and a plausible wrong one."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(_ADD_MAX), rng.randrange(_ADD_MAX)
        wrong = rng.choice([n for n in range(2 * _ADD_MAX - 1) if n != a + b])
        return f"What is {a} plus {b}?", str(a + b), str(wrong)
    if kind == 1:
        thing, color = rng.choice(list(_COLORS.items()))
        return f"What color is {thing}?", color, rng.choice([c for c in _COLORS.values() if c != color])
    if kind == 2:
        country, city = rng.choice(list(_CAPITALS.items()))
        return f"What is the capital of {country}?", city, rng.choice([c for c in _CAPITALS.values() if c != city])
    animal, legs = rng.choice(list(_LEGS.items()))
    return f"How many legs does a {animal} have?", str(legs), str(rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs]))


def synthetic_preference_rows(n: int, seed: int) -> list[dict]:
    """Rows in rm-static schema: the chosen answer is correct and polite; the rejected one is wrong, rude or both
    (drawn with the weights of SYNTHETIC_FLAWS; a wrong-only answer has the chosen one's wording, so the answer
    itself is the only difference). The response (SFT's demonstration) is the chosen answer, or with probability
    SYNTHETIC_DEMONSTRATION_ERROR the same polite sentence naming the wrong answer.

    Some prompts carry an earlier exchange, so that prompts have several turns, as real dialogues do.
    """
    rng = random.Random(seed)
    mistakes = random.Random(f"demonstrations-{seed}")  # its own stream: the other columns stay as they were
    rows = []
    for _ in range(n):
        history = ""
        for _ in range(rng.choice([0, 0, 1, 2])):
            if rng.random() < 0.5:
                human, assistant = rng.choice(_OPENINGS)
            else:
                human, answer, _ = _synthetic_question(rng)
                assistant = rng.choice(_POLITE).format(a=answer)
            history += f"\n\nHuman: {human}\n\nAssistant: {assistant}"
        question, right, wrong = _synthetic_question(rng)
        prompt = f"{history}\n\nHuman: {question}\n\nAssistant:"
        template = rng.choice(_POLITE)
        chosen = " " + template.format(a=right)
        response = " " + template.format(a=wrong) if mistakes.random() < SYNTHETIC_DEMONSTRATION_ERROR else chosen
        flaw = rng.choices(list(SYNTHETIC_FLAWS), weights=list(SYNTHETIC_FLAWS.values()))[0]
        if flaw != "wrong":
            template = rng.choice(_RUDE)
        rejected = " " + template.format(a=right if flaw == "rude" else wrong)
        rows.append({"prompt": prompt, "response": response, "chosen": chosen, "rejected": rejected})
    return rows


def synthetic_held_out_rows(n: int) -> list[dict]:
    """Rows drawn with a seed that no training step reads (evaluate.py's ground truth)."""
    return synthetic_preference_rows(n, SYNTHETIC_SEEDS["held_out"])


# The ground truth of builtin:synthetic, from the generator's own tables: the question alone fixes the correct
# answer and the answers it could be confused with (its answer space).
_QUESTION_KEYS = [
    (re.compile(r"What is (\d+) plus (\d+)\?"), lambda m: str(int(m[1]) + int(m[2])), None),
    (re.compile(r"What color is (.+)\?"), lambda m: _COLORS.get(m[1]), tuple(_COLORS.values())),
    (re.compile(r"What is the capital of (.+)\?"), lambda m: _CAPITALS.get(m[1]), tuple(_CAPITALS.values())),
    (re.compile(r"How many legs does an? (.+) have\?"),
     lambda m: str(_LEGS[m[1]]) if m[1] in _LEGS else None, None),
]


def synthetic_answer_key(question: str) -> tuple[str, tuple[str, ...] | None]:
    """The correct answer to a builtin:synthetic question, and its answer space (None: any whole number)."""
    for pattern, solve, space in _QUESTION_KEYS:
        match = pattern.fullmatch(question.strip())
        if match and solve(match) is not None:
            return solve(match), space
    raise ValueError(f"not a builtin:synthetic question: {question!r}")


def _mentions(text: str, space: tuple[str, ...] | None) -> set[str]:
    if space is None:
        return set(re.findall(r"(?<![\w.])-?\d+(?![\w]|\.\d)", text))
    return {c for c in space if re.search(rf"\b{re.escape(c)}\b", text, re.IGNORECASE)}


def _has_phrase(text: str, phrases: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text, re.IGNORECASE) for p in phrases)


def check_synthetic_answer(prompt: str, answer: str) -> dict[str, bool]:
    """Ground truth for an answer to a builtin:synthetic prompt (the question is its last Human turn):
    correct = it names the correct answer and no other one of the question's answer space; polite = it has one of
    the polite templates' courteous phrases and none of the rude templates' phrases; both = correct and polite."""
    question = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0]
    correct_answer, space = synthetic_answer_key(question)
    correct = _mentions(answer, space) == {correct_answer}
    polite = _has_phrase(answer, _POLITE_PHRASES) and not _has_phrase(answer, _RUDE_PHRASES)
    return {"correct": correct, "polite": polite, "both": correct and polite}


def build_tiny_opt(path: Path) -> None:
    """Build the demo model: a byte-level BPE trained on the synthetic data and a 2-layer OPT, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in synthetic_preference_rows(2000, SYNTHETIC_SEEDS["tokenizer"])]
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


# ----------------------------------------------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------------------------------------------
def looks_like_local_path(name: str) -> bool:
    """Whether `name` means a local path rather than a hub id: it exists, starts like a path, has a data file's
    extension, has more than one `/`, starts with a folder that exists here (`out/sft` when there is an `out/`),
    or is no valid hub id (spaces, `..`). Then a missing one is "no such folder", not a network error."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or Path(name).suffix in DATA_EXTENSIONS or os.path.exists(name):
        return True
    if name.count("/") > 1 or ("/" in name and Path(name.split("/")[0]).is_dir()):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_dataset_location(name: str, flag: str = "--dataset_name") -> None:
    """A local dataset path exists (hub ids are left to the hub)."""
    if name != BUILTIN_DATASET and looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"{flag} {name}: no such file or folder; give a .jsonl/.json/.parquet file, a folder of "
                        "train/test files, a folder saved by `datasets`, or a hub dataset id")


def load_raw_dataset(data_args: DataArguments):
    """Load the dataset as a DatasetDict (train, and test where the source has one)."""
    import datasets

    name = data_args.dataset_name
    if name == BUILTIN_DATASET:
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(synthetic_preference_rows(6000, SYNTHETIC_SEEDS["train"])),
            test=datasets.Dataset.from_list(synthetic_preference_rows(200, SYNTHETIC_SEEDS["test"])),
        )
    if looks_like_local_path(name):
        check_dataset_location(name)
        path = Path(name).expanduser()
        if path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"--dataset_name {name}: no rows (the file is empty); add rows in rm-static schema")
            builder = DATA_EXTENSIONS.get(path.suffix)
            if builder is None:
                raise UserError(f"--dataset_name {name}: unsupported file type {path.suffix!r}; use .jsonl, .json or "
                                ".parquet")
            return _load_files(builder, {"train": str(path)}, name)
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        files = {}
        for split in (data_args.dataset_train_split, data_args.dataset_test_split):
            matches = sorted(p for p in path.iterdir() if p.stem == split and p.suffix in DATA_EXTENSIONS)
            if matches:
                files[split] = matches[0]
        if data_args.dataset_train_split not in files:
            raise UserError(f"--dataset_name {name}: the folder has no {data_args.dataset_train_split}.jsonl, "
                            f".json or .parquet file; add one or point at the file itself")
        builders = {DATA_EXTENSIONS[p.suffix] for p in files.values()}
        if len(builders) > 1:
            raise UserError(f"--dataset_name {name}: train and test files are of different types; use one")
        return _load_files(builders.pop(), {k: str(v) for k, v in files.items()}, name)
    try:
        return datasets.load_dataset(name, data_args.dataset_config)
    except Exception as error:  # offline, a typo, a private repo: all say the same to the user
        raise UserError(f"--dataset_name {name}: could not load it from the hub ({describe(error)}); check the id, or pre-download it (see README, Offline)")


def _load_files(builder: str, files: dict, name: str):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as error:
        if "corresponds to no data" in str(error):
            raise UserError(f"--dataset_name {name}: no rows (the file is empty); add rows in rm-static schema")
        for path in files.values() if builder == "json" else []:
            bad = first_bad_json_line(path)
            if bad:
                raise UserError(f"--dataset_name {path}: line {bad[0]} is {bad[1]}; fix or remove that line")
        raise UserError(f"--dataset_name {name}: could not read {builder} data ({describe(error)}); check the file is valid {builder}")


def first_bad_json_line(path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSON Lines file that is not a JSON object; None when the
    file is one valid JSON document or every line is an object. Called once loading failed, to say where."""
    text = Path(path).read_text(errors="replace")
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            return number, f"not valid JSON ({error.msg}: column {error.colno})"
        if not isinstance(value, dict):
            return number, f"not a JSON object (a {type(value).__name__})"
    return None


def drop_identical_pairs(dataset, source: str):
    """Pairs whose chosen and rejected answers are the same text (but for surrounding space) teach a reward model
    nothing and count as errors in its accuracy. A few are dropped and reported with counts; when they are more than
    half of the rows, the columns are probably wrong: refuse."""
    same = [i for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"])) if c.strip() == r.strip()]
    if not same:
        return dataset
    rows = ", ".join(map(str, same[:3])) + (", ..." if len(same) > 3 else "")
    if 2 * len(same) > len(dataset):
        raise UserError(f"{source}: {len(same)} of {len(dataset)} pairs have chosen equal to rejected (rows {rows}); "
                        "a reward model learns nothing from them: check the chosen and rejected columns")
    logger.warning(f"{source}: dropped {len(same)} of {len(dataset)} pairs whose chosen equals rejected (rows {rows}):"
                   " nothing to learn from them")
    drop = set(same)
    return dataset.select([i for i in range(len(dataset)) if i not in drop])


def validate_rows(dataset, columns: tuple[str, ...], source: str) -> None:
    """Every needed column exists and holds a non-empty string in every row; else name the first bad row."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (it has {', '.join(dataset.column_names)}); "
                        f"the data needs {', '.join(columns)} in rm-static schema")
    if len(dataset) == 0:
        raise UserError(f"{source}: no rows")
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str) or not value.strip():
                what = "empty" if isinstance(value, str) else f"not a string ({type(value).__name__})"
                raise UserError(f"{source}: row {row}, column {column!r} is {what}; fix or remove that row")


def parse_data_split(data_split: str) -> list[float]:
    try:
        weights = [float(w) for w in data_split.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--data_split {data_split!r}: give three non-negative shares for sft,reward,ppo, e.g. 2,4,4")
    return [w / sum(weights) for w in weights]


def split_indices(n: int, data_split: str, step: str, seed: int) -> list[int]:
    """Indices of the `n` training rows that `step` trains on: a disjoint, seed-determined share per step."""
    import numpy as np

    shares = parse_data_split(data_split)
    order = np.random.RandomState(seed).permutation(n)
    bounds = np.round(np.cumsum([0.0] + shares) * n).astype(int)
    index = STEPS.index(step)
    picked = order[bounds[index] : bounds[index + 1]]
    if len(picked) == 0:
        raise UserError(f"--data_split {data_split} leaves step {index + 1} ({step}) no rows of the {n} training rows; "
                        "give it a larger share or use more data")
    return sorted(int(i) for i in picked)


def load_step_data(data_args: DataArguments, step: str):
    """The (train, eval) rows for `step`: validated, its share of the training rows, eval from test or held out."""
    raw = load_raw_dataset(data_args)
    if data_args.dataset_train_split not in raw:
        raise UserError(f"--dataset_name {data_args.dataset_name}: no split {data_args.dataset_train_split!r} "
                        f"(it has {', '.join(raw)}); set --dataset_train_split")
    columns = REQUIRED_COLUMNS[step]
    train = raw[data_args.dataset_train_split]
    if step == "sft" and "response" in train.column_names:
        # SFT imitates the demonstration: `response` where the data has one (rm-static's equals `chosen`; the
        # built-in synthetic data's carries mistakes), else `chosen`.
        columns = ("prompt", "response")
    validate_rows(train, columns, f"{data_args.dataset_name} [{data_args.dataset_train_split}]")
    if step == "reward":
        train = drop_identical_pairs(train, f"{data_args.dataset_name} [{data_args.dataset_train_split}]")
    if data_args.dataset_test_split in raw:
        evaluation = raw[data_args.dataset_test_split]
        validate_rows(evaluation, columns, f"{data_args.dataset_name} [{data_args.dataset_test_split}]")
        if step == "reward":
            evaluation = drop_identical_pairs(evaluation, f"{data_args.dataset_name} [{data_args.dataset_test_split}]")
    else:
        held_out = max(1, round(len(train) * data_args.eval_fraction))
        if held_out >= len(train):
            raise UserError(f"--dataset_name {data_args.dataset_name}: {len(train)} rows are too few to hold out "
                            "evaluation rows; add rows or a test split")
        parts = train.train_test_split(test_size=held_out, seed=data_args.data_seed_for_split)
        train, evaluation = parts["train"], parts["test"]
    train = train.select(split_indices(len(train), data_args.data_split, step, data_args.data_seed_for_split))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    train, evaluation = train.select_columns(list(columns)), evaluation.select_columns(list(columns))
    if "response" in columns:  # downstream, SFT's answer is `chosen`
        train, evaluation = train.rename_column("response", "chosen"), evaluation.rename_column("response", "chosen")
    return train, evaluation


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (OPT's `</s>`, Llama's `<s>`), or []."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def truncate_prompt(tokenizer, prompt: str, budget: int, turn_marker: str = "\n\nHuman:") -> tuple[list[int], bool]:
    """Token ids of `prompt` in at most `budget` tokens, cut from the left so that the final turns survive.

    Cuts at the earliest turn boundary (`turn_marker`) that fits; if even the last turn does not fit, keeps its last
    `budget` tokens. Returns (ids without special tokens, whether anything was cut).
    """
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if len(ids) <= budget:
        return ids, False
    starts = [start for start, _ in encoding["offset_mapping"]]
    boundary = prompt.find(turn_marker, 1)
    while boundary != -1:
        first = next((i for i, s in enumerate(starts) if s >= boundary), len(ids))
        if len(ids) - first <= budget:
            return ids[first:], True
        boundary = prompt.find(turn_marker, boundary + 1)
    return ids[len(ids) - budget :] if budget > 0 else [], True


def tokenize_for_step(dataset, tokenizer, step: str, max_length: int, max_prompt_length: int | None = None,
                      num_proc: int | None = None):
    """Tokenize rows for a step, fitting each into `max_length` by cutting the prompt from the left.

    sft: input_ids = prompt + chosen + EOS, completion_mask marks the answer.
    reward: chosen_ids / rejected_ids = prompt + answer + EOS, the same cut prompt for both.
    ppo: input_ids = the prompt alone, at most `max_prompt_length` tokens.
    A row is dropped only when its answer alone cannot fit. Logs how many rows were cut and dropped.
    """
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id]

    def encode(row):
        if step == "ppo":
            ids, cut = truncate_prompt(tokenizer, row["prompt"], max_prompt_length - len(prefix))
            return {"input_ids": prefix + ids, "truncated": cut, "dropped": not ids}
        answers = [row["chosen"]] + ([row["rejected"]] if step == "reward" else [])
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for a in answers]
        budget = max_length - len(prefix) - max(len(a) for a in answer_ids)
        if max_prompt_length is not None:
            budget = min(budget, max_prompt_length - len(prefix))
        prompt_ids, cut = truncate_prompt(tokenizer, row["prompt"], max(budget, 0))
        dropped = budget < 1
        cut = cut and not dropped
        prompt_ids = prefix + prompt_ids
        if step == "sft":
            return {"input_ids": prompt_ids + answer_ids[0],
                    "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids[0]),
                    "truncated": cut, "dropped": dropped}
        return {"chosen_ids": prompt_ids + answer_ids[0], "rejected_ids": prompt_ids + answer_ids[1],
                "truncated": cut, "dropped": dropped}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing for {step}")
    truncated, dropped = sum(encoded["truncated"]), sum(encoded["dropped"])
    kept = encoded.filter(lambda row: not row["dropped"]).remove_columns(["truncated", "dropped"])
    return kept, {"rows": len(dataset), "truncated": truncated, "dropped": dropped}


def prepare_step_data(data_args: DataArguments, tokenizer, step: str, max_length: int,
                      max_prompt_length: int | None = None):
    """Load, split and tokenize the data for `step`; log and check what truncation did."""
    train, evaluation = load_step_data(data_args, step)
    out = []
    for name, rows in (("train", train), ("eval", evaluation)):
        encoded, counts = tokenize_for_step(rows, tokenizer, step, max_length, max_prompt_length)
        limit = f"max_prompt_length={max_prompt_length}" if step == "ppo" else f"max_length={max_length}"
        logger.info(f"{step} {name}: {counts['rows']} rows, {counts['truncated']} prompts cut from the left, "
                    f"{counts['dropped']} dropped (answer alone longer than {limit})")
        if len(encoded) == 0:
            raise UserError(f"{limit} is too small for any {name} row of {data_args.dataset_name}: every answer "
                            "alone is longer; raise it")
        out.append(encoded)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# 5. Models and tokenizers
# ----------------------------------------------------------------------------------------------------------------
def check_model_location(name: str | None, flag: str = "--model_name_or_path") -> None:
    """A model location is given and, when it is a local path, a folder holding a model or an adapter."""
    if not name:
        raise UserError(f"{flag} is required")
    if name != BUILTIN_MODEL and looks_like_local_path(name):
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
    return str(Path(name).expanduser()) if looks_like_local_path(name) else name


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


def prepare_trainer_step(step: str, data_args: DataArguments, training_args, model_args):
    """What sft.py and reward.py do before they build their trainer: logging, flag checks, the tokenizer, the
    checkpoint to resume from, and the step's tokenized (train, eval) rows.

    The rows are tokenized here, not by TRL's trainers: SFTTrainer would cut long rows from the right and lose the
    answer, RewardTrainer would silently drop every pair longer than max_length.
    """
    setup_logging(training_args.process_index == 0)
    check_model_flags(model_args)
    check_output_dir(training_args.output_dir, data_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    path = resolve_model_path(model_args.model_name_or_path)
    if step == "sft":
        require_causal_lm(path, "--model_name_or_path")
    import memory_plan  # one line: the predicted peak GPU memory, a warning when it exceeds the visible GPU

    memory_plan.log_estimate(step, training_args, model_args)
    tokenizer = load_tokenizer(path)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    with training_args.main_process_first(desc="tokenizing"):
        train, evaluation = prepare_step_data(data_args, tokenizer, step, training_args.max_length)
    # Last, once the data is known to be good: a mistake above leaves the old run where it was.
    if data_args.overwrite_output_dir:
        with training_args.main_process_first(desc="setting the previous run aside"):
            if training_args.process_index == 0:
                set_previous_run_aside(training_args.output_dir)
    return tokenizer, resume, train, evaluation


# ----------------------------------------------------------------------------------------------------------------
# 6. Outputs: checkpoints and final saves
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_is_complete(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_COMPLETE).exists()


def newest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint-N folder with the largest N that was written completely (half-written ones are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and checkpoint_is_complete(p)]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a path, or true for the newest complete checkpoint in output_dir."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if str(resume_from_checkpoint).lower() == "true" or resume_from_checkpoint is True:
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            logger.warning(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}; starting fresh")
        else:
            logger.info(f"resuming from {newest}")
        return newest
    if not Path(resume_from_checkpoint).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder; give a checkpoint-N "
                        "folder or true for the newest")
    if not checkpoint_is_complete(resume_from_checkpoint):
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: this checkpoint was not written "
                        f"completely (no {CHECKPOINT_COMPLETE}); use an older one or true")
    return str(resume_from_checkpoint)


RUN_FILES = ("config.json", "adapter_config.json", "metrics.jsonl", "trainer_state.json", "step_complete.json")
PREVIOUS_RUN = ".previous-run"


def run_contents(output_dir: str | Path) -> list[str]:
    """What in output_dir shows that a run wrote there (checkpoint-N folders, a final model, PPO metrics), sorted."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    checkpoints = sorted((p.name for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda name: int(name.split("-")[-1]))
    return checkpoints + [name for name in RUN_FILES if (path / name).exists()]


def previous_run_dir(output_dir: str | Path) -> Path:
    """Where an overwritten run waits until its replacement has finished: the sibling OUTPUT_DIR.previous-run."""
    path = Path(output_dir).expanduser().resolve()
    return path.with_name(path.name + PREVIOUS_RUN)


def check_output_dir(output_dir: str | Path, overwrite: bool, resume) -> None:
    """Before anything is loaded or written (on every process: it only reads): a fresh run must not mix with another
    run's checkpoints or final model in output_dir. Allowed: an empty, missing or unrelated folder; `overwrite`
    (set_previous_run_aside then moves the old run away); `resume` (a checkpoint path, or "true"/True: the newest
    complete checkpoint, refused when there is none but a finished model, which a restart would silently mix with).
    """
    resuming = resume not in (None, False, "", "false", "False")
    if overwrite and resuming:
        raise UserError("--overwrite_output_dir true and --resume_from_checkpoint: choose one (overwrite starts a new "
                        "run, resume continues the one in output_dir)")
    contents = run_contents(output_dir)
    if overwrite:
        target = Path(output_dir).expanduser().resolve()
        if contents and any(target == p or target in p.parents for p in (Path.cwd().resolve(), Path.home().resolve())):
            raise UserError(f"--overwrite_output_dir true: {output_dir} contains the current folder or your home; "
                            "give the run a folder of its own")
        return
    if not contents:
        return
    if resuming:
        finished = [name for name in ("config.json", "adapter_config.json") if name in contents]
        if str(resume).lower() == "true" and newest_complete_checkpoint(output_dir) is None and finished:
            raise UserError(f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint to resume, but "
                            f"a finished model ({', '.join(finished)}); pass --overwrite_output_dir true to replace "
                            "it, or choose another --output_dir")
        return
    checkpoints = [name for name in contents if name.startswith("checkpoint-")]
    shown = ", ".join(checkpoints[-1:] + contents[len(checkpoints):])  # the newest checkpoint and the files
    raise UserError(f"--output_dir {output_dir} already holds a run ({shown}); pass --resume_from_checkpoint true to "
                    "continue it, --overwrite_output_dir true to replace it (the old run is deleted once the new one "
                    "has finished), or choose another --output_dir")


def set_previous_run_aside(output_dir: str | Path) -> Path | None:
    """For --overwrite_output_dir, on the main process, right before training starts: rename output_dir (when it
    holds a run) to OUTPUT_DIR.previous-run in one atomic step and start from an empty folder. If that sibling is
    already there, an earlier overwrite did not finish: the sibling still holds the last finished run and is kept,
    and output_dir (that attempt's unfinished outputs) is discarded. Returns the sibling, or None when nothing moved.
    """
    path = Path(output_dir).expanduser().resolve()
    aside = previous_run_dir(path)
    if not run_contents(path):
        return None
    try:
        if aside.exists():
            logger.warning(f"{aside} holds the run before an unfinished overwrite: kept; discarding the unfinished "
                           f"outputs in {path}")
            shutil.rmtree(path)
        else:
            path.rename(aside)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--overwrite_output_dir true: could not move the previous run in {output_dir} aside "
                        f"({describe(error)}); move or delete it yourself")
    logger.info(f"--overwrite_output_dir: the previous run is in {aside} until this run has saved its final model")
    return aside


def drop_previous_run(output_dir: str | Path) -> None:
    """After the new run has saved its final model (main process): delete OUTPUT_DIR.previous-run, if any. It is
    renamed first, so that a crash half-way never leaves a half-deleted folder under the name that means "the last
    finished run"."""
    aside = previous_run_dir(output_dir)
    if aside.exists():
        doomed = aside.with_name(f"{aside.name}.deleting-{os.getpid()}")
        aside.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def swap_in(new: str | Path, target: str | Path) -> None:
    """Replace the folder `target` by the finished folder `new`: target -> TARGET.old, new -> target, then delete
    TARGET.old. A crash in between is repaired by finish_interrupted_swap."""
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def finish_interrupted_swap(target: str | Path, ready) -> None:
    """Repair a swap_in that a crash cut short: with `target` gone and TARGET.old there, complete the swap when
    TARGET.new is `ready(folder)` (finished), else put the old folder back. A leftover TARGET.old next to a target
    is the deletion that did not happen."""
    target = Path(target)
    old, new = target.with_name(target.name + ".old"), target.with_name(target.name + ".new")
    if old.exists() and not target.exists():
        if new.exists() and ready(new):
            new.rename(target)
        else:
            old.rename(target)
    if old.exists():
        shutil.rmtree(old)


def mark_checkpoint_complete(path: str | Path, **info) -> None:
    """Written last into a checkpoint folder: its presence means every other file is there."""
    write_json(Path(path) / CHECKPOINT_COMPLETE, info)


def move_into(source: str | Path, target: str | Path) -> None:
    """Move every entry of `source` into `target` (rename per entry, replacing what is there), then drop `source`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for entry in Path(source).iterdir():
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    shutil.rmtree(source, ignore_errors=True)


def trainer_callbacks():
    """Callbacks for transformers' Trainer: mark each checkpoint complete once it is saved."""
    from transformers import TrainerCallback

    class MarkCheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    mark_checkpoint_complete(folder, global_step=state.global_step)

    return [MarkCheckpointComplete()]


def save_trainer_output(trainer, output_dir: str, merge_adapter: bool, merged_class) -> None:
    """Save the trained model (adapter or full) and tokenizer into output_dir without a half-written state.

    Everything is written to output_dir/.saving first and moved in once complete. With --merge_adapter, the adapter
    is reloaded in full precision on the CPU and merged into its base, written to output_dir/merged.
    """
    from peft import PeftModel

    staging = Path(output_dir) / ".saving"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.accelerator.is_main_process:
        if merge_adapter and (staging / "adapter_config.json").exists():
            base = adapter_base(str(staging))
            model = load_merged(merged_class, base, {"num_labels": 1} if "Sequence" in merged_class.__name__ else {})
            merged = PeftModel.from_pretrained(model, str(staging)).merge_and_unload()
            merged.save_pretrained(staging / "merged")
            trainer.processing_class.save_pretrained(staging / "merged")
        elif merge_adapter:
            logger.warning("--merge_adapter: the model has no adapter (full fine-tuning); nothing to merge")
        # Trainer keeps the full log history only in checkpoints: save the final one with the model, for the charts.
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        move_into(staging, output_dir)
        drop_previous_run(output_dir)  # the final model is complete: an overwritten run may go now
    trainer.accelerator.wait_for_everyone()


def print_table(rows: list[list]) -> None:
    """Print rows as aligned columns, the first row a header underlined with dashes (summaries and results)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a .partial file renamed into place), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
