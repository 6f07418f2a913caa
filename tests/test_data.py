"""The data pipeline of simple_rlhf/data.py: loading, validation, the split between steps, tokenization with truncation."""

import json

import datasets
import pytest

from simple_rlhf import data, models, synthetic
from simple_rlhf.data import DataArguments
from simple_rlhf.errors import UserError


def rows(n, start=0):
    return [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "response": " yes", "chosen": f" yes {i}",
             "rejected": f" no {i}"} for i in range(start, start + n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer(script_env):
    return models.load_tokenizer(models.resolve_model_path(models.BUILTIN_MODEL))


# ---- the split between steps -----------------------------------------------------------------------------------
def test_split_is_disjoint_complete_and_deterministic():
    parts = [data.split_indices(1000, "2,4,4", step, seed=7) for step in data.STEPS]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert set(parts[0]).isdisjoint(parts[1]) and set(parts[1]).isdisjoint(parts[2]) and set(parts[0]).isdisjoint(parts[2])
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(1000))
    assert parts == [data.split_indices(1000, "2,4,4", step, seed=7) for step in data.STEPS]
    assert parts[0] != data.split_indices(1000, "2,4,4", "sft", seed=8)


def test_steps_get_disjoint_rows_of_a_real_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows(300))
    prompts = {}
    for step in data.STEPS:
        train, evaluation = data.load_step_data(DataArguments(dataset_name=str(path), eval_fraction=0.1), step)
        prompts[step] = set(train["prompt"])
        assert len(evaluation) == 30  # held out, since a single file has no test split
        assert prompts[step].isdisjoint(evaluation["prompt"])
    assert not prompts["sft"] & prompts["reward"] and not prompts["reward"] & prompts["ppo"]
    assert len(prompts["sft"]) + len(prompts["reward"]) + len(prompts["ppo"]) == 270


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "0,0,0", "-1,2,2"])
def test_bad_data_split_is_rejected(bad):
    with pytest.raises(UserError, match="--data_split"):
        data.parse_data_split(bad)


def test_split_that_leaves_a_step_no_rows(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows(50))
    with pytest.raises(UserError, match=r"leaves step 2 \(reward\) no rows"):
        data.load_step_data(DataArguments(dataset_name=str(path), data_split="1,0,1"), "reward")


# ---- loading every kind of source ------------------------------------------------------------------------------
def test_loads_files_folders_and_saved_datasets(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(40))
    write_jsonl(tmp_path / "test.jsonl", rows(5, start=100))
    folder = data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path)))
    assert (len(folder["train"]), len(folder["test"])) == (40, 5)

    (tmp_path / "pairs.json").write_text(json.dumps(rows(12)))
    assert len(data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "pairs.json")))["train"]) == 12

    datasets.Dataset.from_list(rows(9)).to_parquet(tmp_path / "pairs.parquet")
    assert len(data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "pairs.parquet")))["train"]) == 9

    datasets.DatasetDict(train=datasets.Dataset.from_list(rows(7)), test=datasets.Dataset.from_list(rows(3))).save_to_disk(
        tmp_path / "saved")
    saved = data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "saved")))
    assert (len(saved["train"]), len(saved["test"])) == (7, 3)


def test_test_split_is_used_for_evaluation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(40))
    write_jsonl(tmp_path / "test.jsonl", rows(5, start=100))
    train, evaluation = data.load_step_data(DataArguments(dataset_name=str(tmp_path)), "sft")
    assert sorted(evaluation["prompt"]) == sorted(r["prompt"] for r in rows(5, start=100))
    assert len(train) == 8  # 2/10 of 40


def test_builtin_synthetic_data_is_deterministic_and_prefers_correct_polite_answers():
    first = synthetic.synthetic_preference_rows(50, seed=3)
    assert first == synthetic.synthetic_preference_rows(50, seed=3)
    for row in first:
        assert row["prompt"].endswith("\n\nAssistant:") and row["chosen"] != row["rejected"]
        assert not any(rude.split("{a}")[-1].strip() in row["chosen"] for rude in synthetic._RUDE)


# ---- bad input: one clear message naming the problem -----------------------------------------------------------
def test_sft_imitates_the_response_column_where_the_data_has_one(tmp_path):
    with_response = write_jsonl(tmp_path / "with.jsonl", rows(40))
    train, evaluation = data.load_step_data(DataArguments(dataset_name=str(with_response), data_split="1,0,0"),
                                              "sft")
    assert set(train["chosen"]) == set(evaluation["chosen"]) == {" yes"}  # the response, not the chosen " yes {i}"
    without = write_jsonl(tmp_path / "without.jsonl", [{k: v for k, v in r.items() if k != "response"}
                                                       for r in rows(40)])
    train, _ = data.load_step_data(DataArguments(dataset_name=str(without), data_split="1,0,0"), "sft")
    assert all(answer.startswith(" yes ") for answer in train["chosen"])
    train, _ = data.load_step_data(DataArguments(dataset_name=str(with_response), data_split="0,1,0"), "reward")
    assert all(answer.startswith(" yes ") for answer in train["chosen"])  # the reward model keeps the pairs


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "nope.jsonl")))


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}] * 10)
    with pytest.raises(UserError, match="missing column\\(s\\) rejected"):
        data.load_step_data(DataArguments(dataset_name=str(path)), "reward")
    data.load_step_data(DataArguments(dataset_name=str(path), eval_fraction=0.2), "sft")  # SFT needs no rejected


@pytest.mark.parametrize("value, what", [("", "empty"), ("   ", "empty"), (None, "not a string")])
def test_empty_or_non_string_value_names_the_row(tmp_path, value, what):
    records = rows(10)
    records[6]["chosen"] = value
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(UserError, match=f"row 6, column 'chosen' is {what}"):
        data.load_step_data(DataArguments(dataset_name=str(path)), "reward")
    records[6]["chosen"], records[6]["response"] = " yes", value  # SFT reads the response, where there is one
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(UserError, match=f"row 6, column 'response' is {what}"):
        data.load_step_data(DataArguments(dataset_name=str(path)), "sft")


def test_empty_dataset(tmp_path):
    with pytest.raises(UserError, match="no rows"):
        data.load_step_data(DataArguments(dataset_name=str(write_jsonl(tmp_path / "empty.jsonl", []))), "sft")
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]).select([]).to_parquet(
        tmp_path / "empty.parquet")
    with pytest.raises(UserError, match="no rows"):
        data.load_step_data(DataArguments(dataset_name=str(tmp_path / "empty.parquet")), "sft")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "pairs.csv").write_text("prompt,chosen\n")
    with pytest.raises(UserError, match="unsupported file type"):
        data.load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "pairs.csv")))


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="--model_name_or_path .*no such folder"):
        models.resolve_model_path(str(tmp_path / "missing-model"))


def test_quantization_without_lora_is_rejected():
    from trl import ModelConfig

    with pytest.raises(UserError, match="--load_in_4bit needs --use_peft"):
        models.check_model_flags(ModelConfig(load_in_4bit=True, use_peft=False))
    models.check_model_flags(ModelConfig(load_in_4bit=True, use_peft=True))


# ---- tokenization: cut prompts from the left, keep the answer, count everything ----------------------------------
def long_row(turns=30):
    history = "".join(f"\n\nHuman: tell me about item {i}\n\nAssistant: item {i} is fine" for i in range(turns))
    return {"prompt": history + "\n\nHuman: What is 2 plus 3?\n\nAssistant:", "chosen": " 5. I hope that helps!",
            "rejected": " 7, you idiot."}


@pytest.mark.parametrize("step", ["sft", "reward"])
def test_long_row_is_cut_from_the_left_at_a_turn_and_keeps_its_answer(tokenizer, step):
    row = long_row()
    encoded, counts = data.tokenize_for_step(datasets.Dataset.from_list([row]), tokenizer, step, max_length=64)
    assert counts == {"rows": 1, "truncated": 1, "dropped": 0}
    ids = encoded[0]["input_ids" if step == "sft" else "chosen_ids"]
    assert len(ids) <= 64
    text = tokenizer.decode(ids)
    assert text.startswith("\n\nHuman:"), "the cut falls on a turn boundary"
    assert text.endswith("\n\nHuman: What is 2 plus 3?\n\nAssistant: 5. I hope that helps!</s>")
    if step == "sft":
        answer = [t for t, m in zip(ids, encoded[0]["completion_mask"]) if m]
        assert tokenizer.decode(answer) == " 5. I hope that helps!</s>"
    else:
        assert tokenizer.decode(encoded[0]["rejected_ids"]).endswith("Assistant: 7, you idiot.</s>")
        assert encoded[0]["chosen_ids"][:10] == encoded[0]["rejected_ids"][:10], "both answers share one cut prompt"


def test_turn_longer_than_the_budget_is_cut_inside_the_turn(tokenizer):
    row = {"prompt": "\n\nHuman: " + "very " * 200 + "long?\n\nAssistant:", "chosen": " ok", "rejected": " no"}
    encoded, counts = data.tokenize_for_step(datasets.Dataset.from_list([row]), tokenizer, "sft", max_length=32)
    assert counts["truncated"] == 1 and len(encoded[0]["input_ids"]) <= 32
    assert tokenizer.decode(encoded[0]["input_ids"]).endswith("long?\n\nAssistant: ok</s>")


def test_row_whose_answer_cannot_fit_is_dropped_and_counted(tokenizer):
    fits, too_long = long_row(2), dict(long_row(2), chosen=" words" * 100)
    encoded, counts = data.tokenize_for_step(datasets.Dataset.from_list([fits, too_long, fits]), tokenizer, "sft",
                                               max_length=48)
    assert counts == {"rows": 3, "truncated": 2, "dropped": 1}
    assert len(encoded) == 2


def test_max_length_too_small_for_any_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows(20))
    with pytest.raises(UserError, match="max_length=3 is too small for any"):
        data.prepare_step_data(DataArguments(dataset_name=str(path)), tokenizer, "sft", max_length=3)


def test_ppo_prompts_are_cut_to_max_prompt_length(tokenizer):
    encoded, counts = data.tokenize_for_step(datasets.Dataset.from_list([long_row()]), tokenizer, "ppo",
                                               max_length=None, max_prompt_length=40)
    assert counts["truncated"] == 1 and len(encoded[0]["input_ids"]) <= 40
    assert tokenizer.decode(encoded[0]["input_ids"]).endswith("What is 2 plus 3?\n\nAssistant:")


def test_opt_style_bos_survives_left_truncation(gpt2_tokenizer):
    """Tokenizers that prepend a special token (OPT's </s>) keep it at the start after the cut."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path)
    tokenizer.add_bos_token = True
    prefix = data.special_prefix(tokenizer)
    encoded, _ = data.tokenize_for_step(datasets.Dataset.from_list([long_row()]), tokenizer, "sft", max_length=64)
    assert encoded[0]["input_ids"][: len(prefix)] == prefix


# ---- the real HH data, when ../shared has it ----------------------------------------------------------------------
def test_real_hh_pairs_through_the_local_loader_and_split(hh_data, gpt2_tokenizer):
    data_args = DataArguments(dataset_name=str(hh_data))
    train, evaluation = data.load_step_data(data_args, "reward")
    assert len(train) == 1600 and len(evaluation) == 500  # 4/10 of 4,000; the folder's test.jsonl
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    encoded, counts = data.tokenize_for_step(train, gpt2_tokenizer, "reward", max_length=256)
    assert counts["rows"] == 1600 and len(encoded) == 1600 - counts["dropped"]
    assert counts["truncated"] > 100, "real dialogues are often longer than 256 tokens"
    assert counts["dropped"] < 0.1 * counts["rows"], "TRL would drop about a third; we keep all that can fit"
    assert max(len(ids) for ids in list(encoded["chosen_ids"]) + list(encoded["rejected_ids"])) <= 256
    answers = {answer + gpt2_tokenizer.eos_token for answer in train["chosen"]}
    for row in encoded.select(range(50)):  # every kept pair ends with its whole answer
        text = gpt2_tokenizer.decode(row["chosen_ids"])
        assert any(text.endswith(answer) for answer in answers)
