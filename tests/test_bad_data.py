"""Data and models that would make a step learn or run silently wrong: refused, or dropped and reported with counts."""

import json
import logging

import pytest

from simple_rlhf import arguments, data, models, synthetic
from simple_rlhf.data import DataArguments
from simple_rlhf.errors import UserError


def pairs(n):
    return [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": f" no {i}"}
            for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- identical pairs ------------------------------------------------------------------------------------------------
def test_pairs_whose_chosen_equals_rejected_are_dropped_and_counted(tmp_path, caplog):
    records = pairs(100)
    for i in (3, 50, 71):
        records[i]["rejected"] = records[i]["chosen"] + "  "  # the same answer, but for trailing space
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="simple_rlhf"):
        train, evaluation = data.load_step_data(DataArguments(dataset_name=str(path), eval_fraction=0.1,
                                                                data_split="0,1,0"), "reward")
    assert len(train) + len(evaluation) == 97
    assert all(c.strip() != r.strip() for c, r in zip(list(train["chosen"]) + list(evaluation["chosen"]),
                                                       list(train["rejected"]) + list(evaluation["rejected"])))
    assert f"{path} [train]: dropped 3 of 100 pairs whose chosen equals rejected (rows 3, 50, 71)" in caplog.text


def test_data_where_most_pairs_are_identical_is_refused(tmp_path):
    records = [{**r, "rejected": r["chosen"]} for r in pairs(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(UserError, match=r"30 of 30 pairs have chosen equal to rejected \(rows 0, 1, 2, \.\.\.\)"):
        data.load_step_data(DataArguments(dataset_name=str(path)), "reward")


def test_identical_pairs_do_not_matter_to_sft(tmp_path):
    records = [{**r, "rejected": r["chosen"]} for r in pairs(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    train, _ = data.load_step_data(DataArguments(dataset_name=str(path), data_split="1,0,0"), "sft")
    assert len(train) == 29


def test_evaluating_on_the_training_split_is_refused(capsys):
    import sft

    with pytest.raises(SystemExit):
        arguments.parse_args(sft.ARGUMENTS, ["--config", "recipes/demo/sft.yaml", "--dataset_test_split", "train"])
    assert "--dataset_test_split train is the training split" in capsys.readouterr().err


# ---- malformed JSON lines ---------------------------------------------------------------------------------------------
def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in pairs(5)]
    lines[3] = lines[3][:-5]  # cut short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        data.load_raw_dataset(DataArguments(dataset_name=str(path)))
    assert str(error.value).startswith(f"--dataset_name {path}: line 4 is not valid JSON (")
    assert str(error.value).endswith("; fix or remove that line")


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pairs(1)[0]) + "\n" + '["a list"]\n')
    with pytest.raises(UserError, match=r"line 2 is not a JSON object \(a list\)"):
        data.load_raw_dataset(DataArguments(dataset_name=str(path)))


# ---- the right kind of model in each place ----------------------------------------------------------------------------
def test_require_causal_lm(reward_like_model, tmp_path, script_env):
    models.require_causal_lm(models.resolve_model_path(models.BUILTIN_MODEL), "--model_path")
    with pytest.raises(UserError, match=r"--sft_model_path .*: not a causal language model \(architectures "
                                        r"\['OPTForSequenceClassification'\]\)"):
        models.require_causal_lm(str(reward_like_model), "--sft_model_path")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": "x"}))
    with pytest.raises(UserError, match="a SEQ_CLS adapter, not a causal language model"):
        models.require_causal_lm(str(tmp_path), "--policies rm")


def test_evaluate_refuses_a_classifier_as_policy(reward_like_model, tmp_path, capsys):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(evaluate.EvalArguments(policies=[f"rm={reward_like_model}"], output_dir=str(tmp_path / "out")),
                      DataArguments(dataset_name=synthetic.BUILTIN_DATASET))
    assert exit_info.value.code == 2
    assert "--policies rm" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_chat_refuses_a_classifier(reward_like_model, capsys):
    import chat

    with pytest.raises(SystemExit) as exit_info:
        chat.main(chat.ChatArguments(model_path=str(reward_like_model), prompt="hi"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model_path" in err and "not a causal language model" in err


def test_sft_refuses_a_classifier_as_its_start(reward_like_model, tmp_path, capsys):
    import sft

    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        sft.main(*arguments.parse_args(sft.ARGUMENTS, ["--config", "recipes/demo/sft.yaml", "--model_name_or_path",
                                                    str(reward_like_model), "--output_dir", str(out)]))
    assert "not a causal language model" in capsys.readouterr().err and not out.exists()
