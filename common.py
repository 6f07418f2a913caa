"""What sft.py, reward.py and ppo.py share: arguments, data, models, outputs.

Read top to bottom:
1. errors: `UserError` and `exit_on_user_error`, so a user's mistake is one line and exit code 2;
2. arguments: the dataclass every step adds to TRL's, and `parse_args`;
3. the built-in offline demo: a synthetic preference dataset and a tiny OPT model with its own tokenizer;
4. data: load (hub id, file, folder), validate, split between steps, tokenize with left truncation;
5. models and tokenizers: resolve names and paths, load (with an SFT adapter merged in, 4-bit), check flags;
6. outputs: complete-checkpoint markers, resume resolution, atomic final saves.
"""

from __future__ import annotations

import functools
import json
import logging
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


def parse_args(dataclass_types, argv=None):
    """Parse dataclasses TRL's way (flags, or a YAML `--config` that flags override).

    Without a GPU, transformers refuses bf16 unless the arguments say `use_cpu`; add it, so that the same recipe
    runs on a laptop, in CI and on a GPU machine.
    """
    import torch
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not any(arg.startswith("--use_cpu") for arg in argv):
        argv += ["--use_cpu", "true"]
    parser = TrlParser(dataclass_types)
    return parser.parse_args_and_config(args=argv)


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
    (drawn with the weights of SYNTHETIC_FLAWS; a wrong-only answer has the chosen one's template, so the answer
    itself is the only difference).

    Some prompts carry an earlier exchange, so that prompts have several turns, as real dialogues do.
    """
    rng = random.Random(seed)
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
        flaw = rng.choices(list(SYNTHETIC_FLAWS), weights=list(SYNTHETIC_FLAWS.values()))[0]
        if flaw != "wrong":
            template = rng.choice(_RUDE)
        rejected = " " + template.format(a=right if flaw == "rude" else wrong)
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected})
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
def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in DATA_EXTENSIONS or os.path.exists(name)


def load_raw_dataset(data_args: DataArguments):
    """Load the dataset as a DatasetDict (train, and test where the source has one)."""
    import datasets

    name = data_args.dataset_name
    if name == BUILTIN_DATASET:
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(synthetic_preference_rows(6000, SYNTHETIC_SEEDS["train"])),
            test=datasets.Dataset.from_list(synthetic_preference_rows(200, SYNTHETIC_SEEDS["test"])),
        )
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"--dataset_name {name}: no such file or folder; give a .jsonl/.json/.parquet file, a "
                            "folder of train/test files, a folder saved by `datasets`, or a hub dataset id")
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
        raise UserError(f"--dataset_name {name}: could not read {builder} data ({describe(error)}); check the file is valid {builder}")


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
    validate_rows(train, columns, f"{data_args.dataset_name} [{data_args.dataset_train_split}]")
    if data_args.dataset_test_split in raw:
        evaluation = raw[data_args.dataset_test_split]
        validate_rows(evaluation, columns, f"{data_args.dataset_name} [{data_args.dataset_test_split}]")
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
    keep = list(columns)
    return train.select_columns(keep), evaluation.select_columns(keep)


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
def resolve_model_path(name: str | None, flag: str = "--model_name_or_path") -> str:
    """A loadable model location: the built-in demo model (built on first use), a local folder, or a hub id."""
    if not name:
        raise UserError(f"{flag} is required")
    if name == BUILTIN_MODEL:
        path = cache_dir() / "tiny-opt-v2"  # v2: the tokenizer of the v2 synthetic data
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info(f"building the demo model {BUILTIN_MODEL} in {path}")
            build_tiny_opt(path)
        return str(path)
    if _looks_like_path(name) or name.count("/") > 1:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"{flag} {name}: no such folder; give a model folder, a hub id or {BUILTIN_MODEL}")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{flag} {name}: the folder has neither config.json nor adapter_config.json; point at a "
                            "saved model or adapter (e.g. the output_dir of sft.py)")
        return str(path)
    return name


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder, or None when `path` is not one."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.exists():
        return None
    return json.loads(config_file.read_text())["base_model_name_or_path"]


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
    from peft import PeftConfig, PeftModel
    from accelerate import PartialState
    from trl import get_quantization_config

    path = resolve_model_path(path or model_args.model_name_or_path, flag)
    base = adapter_base(path)
    quantization = get_quantization_config(model_args)
    options = dict(revision=model_args.model_revision, dtype=torch_dtype(model_args.dtype),
                   attn_implementation=model_args.attn_implementation, quantization_config=quantization,
                   device_map=({"": PartialState().local_process_index} if quantization is not None and torch.cuda.is_available() else None), **kwargs)
    try:
        model = auto_class.from_pretrained(base or path, **options)
        if base is not None:
            # The adapter may be for another head (an SFT adapter onto a sequence classifier): load it task-free,
            # which matches on the shared backbone's module names.
            adapter_config = PeftConfig.from_pretrained(path)
            adapter_config.task_type = None
            model = PeftModel.from_pretrained(model, path, config=adapter_config).merge_and_unload()
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: could not load a model ({describe(error)}); check the path "
                        "or hub id, or pre-download it (see README, Offline)")
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
    tokenizer = load_tokenizer(resolve_model_path(model_args.model_name_or_path))
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    with training_args.main_process_first(desc="tokenizing"):
        train, evaluation = prepare_step_data(data_args, tokenizer, step, training_args.max_length)
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
            model = merged_class.from_pretrained(base, **({"num_labels": 1} if "Sequence" in merged_class.__name__ else {}))
            merged = PeftModel.from_pretrained(model, str(staging)).merge_and_unload()
            merged.save_pretrained(staging / "merged")
            trainer.processing_class.save_pretrained(staging / "merged")
        elif merge_adapter:
            logger.warning("--merge_adapter: the model has no adapter (full fine-tuning); nothing to merge")
        # Trainer keeps the full log history only in checkpoints: save the final one with the model, for the charts.
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        move_into(staging, output_dir)
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
