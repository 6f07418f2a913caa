"""Data for the steps: loading (hub id, file, folder), validation, splits, tokenizing with left truncation."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


from simple_rlhf.errors import UserError, describe
from simple_rlhf import synthetic

logger = logging.getLogger("simple_rlhf")


STEPS = ("sft", "reward", "ppo")


REQUIRED_COLUMNS = {"sft": ("prompt", "chosen"), "reward": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}


DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataArguments:
    """Options about the data, shared by the three steps (the rest come from TRL's configs and ModelConfig)."""

    dataset_name: str = field(
        default="Dahoas/rm-static",
        metadata={
            "help": "A hub dataset id, a local .jsonl/.json/.parquet file, a folder of train/test files or one saved "
            f"by `datasets`, or `{synthetic.BUILTIN_DATASET}` (offline demo data). Columns: prompt, chosen, rejected."
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
    if name != synthetic.BUILTIN_DATASET and looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"{flag} {name}: no such file or folder; give a .jsonl/.json/.parquet file, a folder of "
                        "train/test files, a folder saved by `datasets`, or a hub dataset id")


def load_raw_dataset(data_args: DataArguments):
    """Load the dataset as a DatasetDict (train, and test where the source has one)."""
    import datasets

    name = data_args.dataset_name
    if name == synthetic.BUILTIN_DATASET:
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(synthetic.synthetic_preference_rows(6000, synthetic.SYNTHETIC_SEEDS["train"])),
            test=datasets.Dataset.from_list(synthetic.synthetic_preference_rows(200, synthetic.SYNTHETIC_SEEDS["test"])),
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
        files = split_files(data_args)
        if data_args.dataset_train_split not in files:
            raise UserError(f"--dataset_name {name}: the folder has no {data_args.dataset_train_split}.jsonl, "
                            f".json or .parquet file; add one or point at the file itself")
        builders = {DATA_EXTENSIONS[p.suffix] for p in files.values()}
        if len(builders) > 1:
            raise UserError(f"--dataset_name {name}: train and test files are of different types; use one")
        # Each file on its own: loaded together, `datasets` casts the test file to the train file's columns, and a
        # test file with other column names fails as unreadable or gets columns of None.
        builder = builders.pop()
        return datasets.DatasetDict({split: _load_files(builder, {split: str(file)}, str(file))[split]
                                     for split, file in files.items()})
    try:
        return datasets.load_dataset(name, data_args.dataset_config)
    except Exception as error:  # offline, a typo, a private repo: all say the same to the user
        raise UserError(f"--dataset_name {name}: could not load it from the hub ({describe(error)}); check the id, or pre-download it (see README, Offline)")


def split_files(data_args: DataArguments) -> dict[str, Path]:
    """A local folder's files of the train and test splits (train.jsonl, test.parquet, ...), by split name."""
    path, files = Path(data_args.dataset_name).expanduser(), {}
    for split in (data_args.dataset_train_split, data_args.dataset_test_split):
        matches = sorted(p for p in path.iterdir() if p.stem == split and p.suffix in DATA_EXTENSIONS)
        if matches:
            files[split] = matches[0]
    return files


def split_source(data_args: DataArguments, split: str) -> str:
    """How a split is named in messages: its file, for a folder of files (`data/test.jsonl [test]`)."""
    name = data_args.dataset_name
    folder = looks_like_local_path(name) and Path(name).expanduser().is_dir()
    file = split_files(data_args).get(split) if folder else None
    return f"{file or name} [{split}]"


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
    """Every needed column exists and holds a non-empty string in every row; else name the first bad row. A column
    that is empty (None) in every row is missing from the file (`datasets` adds it when another file has it)."""
    missing = [c for c in columns
               if c not in dataset.column_names or (len(dataset) and all(v is None for v in dataset[c]))]
    if missing:
        present = [c for c in dataset.column_names if c not in missing]
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (it has {', '.join(present) or 'none'}); "
                        f"the data needs {', '.join(columns)} in rm-static schema")
    if len(dataset) == 0:
        raise UserError(f"{source}: no rows")
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str) or not value.strip():
                what = "empty" if isinstance(value, str) else f"not a string ({type(value).__name__})"
                raise UserError(f"{source}: row {row}, column {column!r} is {what}; fix or remove that row")


WARNED: set[str] = set()  # warnings given once per process (ppo.py loads its data more than once)


def check_test_rows_unseen(train, evaluation, columns: tuple[str, ...], train_source: str, test_source: str) -> None:
    """Test rows that are also training rows (the same text in every column the step reads) make the evaluation
    read better than the model is: a test split that is all training rows is refused, as naming the training split
    twice is; some are counted in a warning."""
    seen = set(zip(*(train[c] for c in columns)))
    repeated = sum(row in seen for row in zip(*(evaluation[c] for c in columns)))
    if repeated == len(evaluation):
        raise UserError(f"{test_source}: all {repeated} rows are also in the training split {train_source} (same "
                        f"{', '.join(columns)}): evaluation would score rows the model trained on; give a test split of "
                        "other rows, or --dataset_test_split none to hold out --eval_fraction of the training rows")
    message = (f"{test_source}: {repeated} of {len(evaluation)} rows are also in the training split {train_source} "
               f"(same {', '.join(columns)}): the evaluation scores them as unseen; remove them from the test split")
    if repeated and message not in WARNED:
        WARNED.add(message)
        logger.warning(message)


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
    """The (train, eval) rows for `step`: validated, its share of the training rows, eval from test or held out.
    dpo (dpo.py, the one-step alternative to reward + PPO) trains on the reward step's pairs: the same rows."""
    if step == "dpo":
        return load_step_data(data_args, "reward")
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
    train_source = split_source(data_args, data_args.dataset_train_split)
    validate_rows(train, columns, train_source)
    if step == "reward":
        train = drop_identical_pairs(train, train_source)
    if data_args.dataset_test_split in raw:
        evaluation = raw[data_args.dataset_test_split]
        test_source = split_source(data_args, data_args.dataset_test_split)
        validate_rows(evaluation, columns, test_source)
        if data_args.dataset_name != synthetic.BUILTIN_DATASET:  # its few templated questions repeat by design
            check_test_rows_unseen(train, evaluation, columns, train_source, test_source)
        if step == "reward":
            evaluation = drop_identical_pairs(evaluation, test_source)
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
    if step != "ppo":  # PPO keeps every column: reward functions (ppo.py --reward_funcs) may read any of them
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
    dpo: prompt_ids (cut as for reward), chosen_ids / rejected_ids = answer + EOS.
    ppo: input_ids = the prompt alone, at most `max_prompt_length` tokens, beside the row's own columns.
    A row is dropped only when its answer alone cannot fit. Logs how many rows were cut and dropped.
    """
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id]

    def encode(row):
        if step == "ppo":
            ids, cut = truncate_prompt(tokenizer, row["prompt"], max_prompt_length - len(prefix))
            return {"input_ids": prefix + ids, "truncated": cut, "dropped": not ids}
        answers = [row["chosen"]] + ([row["rejected"]] if step in ("reward", "dpo") else [])
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
        if step == "dpo":  # TRL's DPOTrainer takes the prompt and the two answers apart
            return {"prompt_ids": prompt_ids, "chosen_ids": answer_ids[0], "rejected_ids": answer_ids[1],
                    "truncated": cut, "dropped": dropped}
        return {"chosen_ids": prompt_ids + answer_ids[0], "rejected_ids": prompt_ids + answer_ids[1],
                "truncated": cut, "dropped": dropped}

    encoded = dataset.map(encode, remove_columns=dataset.column_names if step != "ppo" else None, num_proc=num_proc,
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


def load_ptx_data(data_args, args, tokenizer):
    """The PTX rows, tokenized as step 1 does (prompt + chosen + EOS), cut to ptx_max_length: by default the PPO
    step's own share of --dataset_name, with their chosen answers; with --ptx_dataset_name, all its training rows.
    The LM loss covers every real token, prompt included, as InstructGPT's pretraining mix does."""
    ptx_data_args = replace(data_args, dataset_name=args.ptx_dataset_name or data_args.dataset_name,
                            data_split="1,0,0", max_train_samples=None)
    rows, _ = load_step_data(ptx_data_args, "sft")  # all training rows, with prompt and chosen
    if args.ptx_dataset_name is None:  # the same rows as the PPO prompts: step 3's share of --data_split
        rows = rows.select(split_indices(len(rows), data_args.data_split, "ppo", data_args.data_seed_for_split))
    if data_args.max_train_samples is not None:
        rows = rows.select(range(min(len(rows), data_args.max_train_samples)))
    encoded, counts = tokenize_for_step(rows, tokenizer, "sft", args.ptx_max_length)
    if len(encoded) < args.ptx_batch_size * int(os.environ.get("WORLD_SIZE", 1)):
        raise UserError(f"--ptx_dataset_name {ptx_data_args.dataset_name}: {len(encoded)} usable rows (of "
                               f"{counts['rows']}) are fewer than one PTX batch; lower --ptx_batch_size or raise "
                               "--ptx_max_length")
    logger.info(f"PTX: {len(encoded)} rows of {ptx_data_args.dataset_name}, loss weight {args.ptx_coef}")
    return encoded


def check_prompts_fit(data_args, tokenizer, max_prompt_length: int) -> None:
    """Prompts are cut from the left at turn boundaries; one whose last turn alone does not fit loses the start of
    the question. Refuse when that is every prompt (the limit is wrong), warn when it is some."""
    rows, _ = load_step_data(data_args, "ppo")
    last_turns = [prompt[max(prompt.rfind("\n\nHuman:"), 0):] for prompt in rows["prompt"]]
    budget = max_prompt_length - len(special_prefix(tokenizer))
    lengths = [len(ids) for ids in tokenizer(last_turns, add_special_tokens=False)["input_ids"]]
    too_long = sum(n > budget for n in lengths)
    if too_long == len(lengths):
        raise UserError(f"--max_prompt_length {max_prompt_length}: the last turn of every prompt is longer "
                               f"(the shortest is {min(lengths) + max_prompt_length - budget} tokens); raise it")
    if too_long:
        logger.warning(f"{too_long} of {len(lengths)} prompts have a last turn longer than --max_prompt_length "
                       f"{max_prompt_length}; they are cut inside that turn")
