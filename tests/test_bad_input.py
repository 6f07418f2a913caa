"""Input mistakes that used to give a traceback, a wrong place or a silent wrong number: each is one line naming the
flag, file or column, or works, or is recorded and said."""

import json
import logging
import shutil

import pytest

from simple_rlhf import arguments, data, models
from simple_rlhf.data import DataArguments
from simple_rlhf.errors import UserError


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs(n, start=0):
    return [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": f" no {i}"}
            for i in range(start, start + n)]


# ---- --config without its file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--config"], ["--config", "--lora_r", "4"]])
def test_config_without_a_value(argv):
    import sft

    with pytest.raises(UserError, match=r"^--config needs a YAML file, e.g. --config recipes/demo/sft.yaml$"):
        arguments.validate_args(sft.ARGUMENTS, argv)


# ---- a test file with other columns ----------------------------------------------------------------------------------
@pytest.mark.parametrize("test_rows, expected", [
    ([{"question": "q", "good": "a", "bad": "b"}], "missing column(s) prompt, chosen, rejected (it has question, "
                                                   "good, bad)"),  # was: not valid JSON
    ([{"prompt": "q", "chosen": "a"}], "missing column(s) rejected (it has prompt, chosen)"),  # was: row 0
])
def test_a_test_file_with_other_columns_is_named_with_its_columns(tmp_path, test_rows, expected):
    write_jsonl(tmp_path / "data" / "train.jsonl", pairs(20))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", test_rows)
    with pytest.raises(UserError) as error:
        data.load_step_data(DataArguments(dataset_name=str(tmp_path / "data")), "reward")
    assert str(error.value) == (f"{test} [test]: {expected}; the data needs prompt, chosen, rejected in rm-static "
                                "schema")


# ---- a test split that repeats training rows -------------------------------------------------------------------------
def test_test_rows_that_are_training_rows_are_counted(tmp_path, caplog):
    write_jsonl(tmp_path / "data" / "train.jsonl", pairs(20))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", pairs(3) + pairs(7, start=100))
    with caplog.at_level(logging.WARNING, logger="simple_rlhf"):
        for _ in range(2):  # ppo.py reads its data more than once: one warning
            data.load_step_data(DataArguments(dataset_name=str(tmp_path / "data"), data_split="0,1,0"), "reward")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{test} [test]: 3 of 10 rows are also in the training split {tmp_path / 'data' / 'train.jsonl'} "
                        "[train] (same prompt, chosen, rejected): the evaluation scores them as unseen; remove them "
                        "from the test split"]


def test_a_test_split_of_training_rows_only_is_refused(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", pairs(20))
    write_jsonl(tmp_path / "data" / "test.jsonl", pairs(5, start=10))
    with pytest.raises(UserError, match=r"test.jsonl \[test\]: all 5 rows are also in the training split .*: evaluation "
                                        r"would score rows the model trained on; .* --dataset_test_split none"):
        data.load_step_data(DataArguments(dataset_name=str(tmp_path / "data")), "sft")


# ---- damaged weights -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(script_env):
    return models.resolve_model_path(models.BUILTIN_MODEL)


@pytest.mark.parametrize("size, why", [(0, "header too small"), (1000, "SafetensorError")])
def test_a_damaged_weights_file_is_named(tmp_path, tiny, size, why):
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    shutil.copytree(tiny, tmp_path / "policy")
    weights = tmp_path / "policy" / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(size)
    with pytest.raises(UserError) as error:
        models.load_model(ModelConfig(model_name_or_path=str(tmp_path / "policy")), AutoModelForCausalLM,
                          flag="--sft_model_path")
    message = str(error.value)
    assert message.startswith(f"--sft_model_path {tmp_path / 'policy'}: {weights} is damaged ({size} bytes; ")
    assert why in message and message.endswith("it was cut short or not written completely; copy or save that model "
                                               "again")


def test_a_damaged_adapter_is_named(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"adapter_model.safetensors is damaged \(0 bytes; "):
        models.load_merged(AutoModelForCausalLM, str(tmp_path / "adapter"), {})


# ---- --lora_target_modules -------------------------------------------------------------------------------------------
def lora(*targets):
    from trl import ModelConfig

    model_args = ModelConfig(use_peft=True, lora_target_modules=list(targets))
    models.check_model_flags(model_args)
    return model_args


def test_lora_targets_that_match_no_module_are_named_with_the_models_layers(tiny):
    with pytest.raises(UserError) as error:
        models.check_lora_targets(lora("q_proj", "v_projj"), tiny, "--model_name_or_path")
    assert str(error.value) == (f"--lora_target_modules v_projj: no module of --model_name_or_path {tiny} matches (its "
                                "linear layers: k_proj, v_proj, q_proj, out_proj, fc1, fc2, lm_head); name some of "
                                "those, or use all-linear")
    for fine in (("q_proj", "v_proj"), ("all-linear",), (".*self_attn.q_proj",)):
        models.check_lora_targets(lora(*fine), tiny, "--model_name_or_path")


def test_one_lora_target_name_adapts_that_module(tiny):
    """TRL turns a one-name list into a pattern of the whole module name, which PEFT then finds nowhere."""
    from dataclasses import replace

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    model_args = lora("q_proj")
    models.check_lora_targets(model_args, tiny, "--model_name_or_path")
    # as sft.py builds it, and as ppo.py's actor_critic re-creates the config (dataclasses.replace)
    for config in (get_peft_config(model_args), get_peft_config(replace(model_args, lora_task_type="CAUSAL_LM"))):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), config)
        assert {name.split(".lora_A")[0].split(".")[-1] for name, _ in model.named_parameters()
                if "lora_A" in name} == {"q_proj"}


@pytest.fixture(scope="module")
def reward_like_model(tmp_path_factory, tiny):
    from transformers import AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("classifier")
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).save_pretrained(path)
    models.load_tokenizer(tiny).save_pretrained(path)
    return path


@pytest.mark.parametrize("script", ["sft", "ppo"])
def test_the_steps_refuse_lora_targets_that_match_nothing_before_training(script, tmp_path, reward_like_model,
                                                                         capsys):
    import importlib

    module = importlib.import_module(script)
    argv = ["--config", f"recipes/demo/{script}.yaml", "--output_dir", str(tmp_path / "out"), "--use_peft", "true",
            "--lora_target_modules", "attn"]
    flag = "--model_name_or_path"
    if script == "ppo":
        argv += ["--sft_model_path", "builtin:tiny-opt", "--reward_model_path", str(reward_like_model)]
        flag = "--sft_model_path"
    with pytest.raises(SystemExit) as exit_info:
        module.main(*arguments.parse_args(module.ARGUMENTS, argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --lora_target_modules attn: no module of {flag} ") and "q_proj" in err
    assert not (tmp_path / "out").exists()


# ---- evaluate.py with --top_k / --top_p ------------------------------------------------------------------------------
def test_evaluate_with_truncated_sampling_reports_no_kl_and_records_it(tmp_path, tiny, capsys):
    import evaluate
    from simple_rlhf import synthetic

    args = evaluate.EvalArguments(policies=["base=builtin:tiny-opt", "sft=builtin:tiny-opt"], top_p=0.9,
                                  max_prompts=2, response_length=3, output_dir=str(tmp_path))
    results = evaluate.main(args, DataArguments(dataset_name=synthetic.BUILTIN_DATASET))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING simple_rlhf" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "--top_k 0 --top_p 0.9: the answers are sampled from the truncated distribution, so scores and win rates are "
        "those of truncated sampling and no KL to the reference is reported; leave --top_k 0 --top_p 1.0 for the "
        "policies' own KL")
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["policy_settings"]["top_p"] == 0.9 and saved["policy_settings"]["top_k"] == 0
    assert all("kl_to_reference" not in policy for policy in saved["policies"].values())
    # Untruncated, the KL is there (the same policy as its reference: 0).
    results = evaluate.main(evaluate.EvalArguments(**{**vars(args), "top_p": 1.0}),
                            DataArguments(dataset_name=synthetic.BUILTIN_DATASET))
    assert results["policies"]["base"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
