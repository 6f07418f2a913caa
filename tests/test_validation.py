"""The one validation layer (simple_rlhf.arguments.parse_args): every flag and config of every script is checked before anything is
written or trained; a mistake is one `error:` line and exit code 2. In-process for speed; a few subprocess runs check
the end-to-end guarantee (exit code, one line, nothing written)."""

import dataclasses
import typing

import pytest

from simple_rlhf import arguments, data
from conftest import python_script, run

SFT_CONFIG = ["--config", "recipes/demo/sft.yaml"]


def sft_arguments():
    import sft

    return sft.ARGUMENTS


def ppo_arguments():
    import ppo
    from trl import ModelConfig

    return (data.DataArguments, ppo.PPOArguments, ModelConfig)


def error_line(capsys, dataclass_types, argv) -> str:
    """The one line that parse_args prints before exiting with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        arguments.parse_args(dataclass_types, argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    assert not any("Traceback" in line or line.startswith("usage:") for line in lines), lines
    return lines[-1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--lora_r", "0", "--lora_r 0: must be at least 1"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size 0: must be at least 1"),
    ("--learning_rate", "0", "--learning_rate 0.0: must be > 0"),
    ("--learning_rate", "-0.0001", "--learning_rate -0.0001: must be > 0"),
    ("--lora_dropout", "1", "--lora_dropout 1.0: must be in [0, 1)"),
    ("--lora_alpha", "0", "--lora_alpha 0: must be > 0"),
    ("--num_train_epochs", "0", "--num_train_epochs 0.0: must be > 0"),
    ("--max_steps", "0", "--max_steps 0: must be -1 or at least 1"),
    ("--eval_fraction", "1", "--eval_fraction 1.0: must be in (0, 1)"),
    ("--max_train_samples", "0", "--max_train_samples 0: must be at least 1"),
    ("--max_length", "0", "--max_length 0: must be at least 1"),
    ("--data_split", "2,4", "--data_split '2,4': give three non-negative shares"),
    ("--seed", "-3", "--seed -3: must be in [0, 4294967295]"),
])
def test_sft_numeric_ranges(capsys, flag, value, expected):
    assert expected in error_line(capsys, sft_arguments(), [*SFT_CONFIG, flag, value])


@pytest.mark.parametrize("flag, value, expected", [
    ("--score_clip", "0", "--score_clip 0.0: must be > 0 (0 makes every score 0"),
    ("--max_steps", "0", "--max_steps 0: must be at least 1"),  # PPO's own max_steps: no -1
    ("--kl_coef", "-0.1", "--kl_coef -0.1: must be at least 0"),
    ("--top_p", "0", "--top_p 0.0: must be in (0, 1]"),
    ("--gamma", "1.5", "--gamma 1.5: must be in [0, 1]"),
    ("--vf_coef", "0", "--vf_coef 0.0: must be > 0"),
    ("--max_grad_norm", "0", "--max_grad_norm 0.0: must be > 0"),  # ppo.py clips to it: 0 zeroes every gradient
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size 0: must be at least 1"),
])
def test_ppo_numeric_ranges_without_ppo_code(capsys, flag, value, expected):
    """PPOArguments' fields are covered by the shared table: ppo.py needs no checks of its own."""
    assert expected in error_line(capsys, ppo_arguments(), ["--config", "recipes/demo/ppo.yaml", flag, value])


def test_a_whole_number_option_given_a_fraction_in_yaml(capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: builtin:tiny-opt\nlora_r: 8.5\n")
    assert "--lora_r 8.5: must be a whole number" in error_line(capsys, sft_arguments(), ["--config", str(config)])


def test_a_number_option_given_a_list_in_yaml(capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("learning_rate: [1, 2]\n")
    assert "--learning_rate [1, 2]: must be a number" in error_line(capsys, sft_arguments(), ["--config", str(config)])


def test_valid_arguments_pass_and_keep_their_values():
    data_args, training_args, model_args = arguments.parse_args(sft_arguments(), [*SFT_CONFIG, "--lora_r", "4",
                                                                              "--max_steps", "-1"])
    assert model_args.lora_r == 4 and training_args.max_steps == -1 and data_args.dataset_name == "builtin:synthetic"


def test_every_numeric_option_of_every_script_has_a_range():
    """A new numeric flag must get a row in simple_rlhf.arguments.RANGES (or be listed as unchecked, with the reason there)."""
    import chat
    import evaluate
    import train

    missing = []
    for cls in (*sft_arguments(), *ppo_arguments(), __import__("reward").ARGUMENTS[1], train.TrainArguments,
                evaluate.EvalArguments, chat.ChatArguments):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = str(hints.get(field.name))
            numeric = hints.get(field.name) in (int, float) or (("int" in kind or "float" in kind) and "str" not in
                                                                 kind and "list" not in kind and "dict" not in kind)
            if numeric and arguments.range_of(cls.__name__, field.name) is None and \
                    field.name not in arguments.UNCHECKED_NUMBERS:
                missing.append(f"{cls.__name__}.{field.name}")
    assert not missing, missing


# ---- flags and configs -------------------------------------------------------------------------------------------
def test_unknown_flag_names_the_closest(capsys):
    line = error_line(capsys, sft_arguments(), [*SFT_CONFIG, "--learnin_rate", "1e-4"])
    assert line == "error: unknown option --learnin_rate; did you mean --learning_rate?"


def test_unknown_yaml_key_names_the_file_and_the_closest(capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: builtin:tiny-opt\nlora_rank: 8\n")
    line = error_line(capsys, sft_arguments(), ["--config", str(config)])
    assert line == f"error: --config {config}: unknown key 'lora_rank'; did you mean 'lora_r'?"


def test_missing_config_file(capsys, tmp_path):
    line = error_line(capsys, sft_arguments(), ["--config", str(tmp_path / "nope.yaml")])
    assert line == f"error: --config {tmp_path / 'nope.yaml'}: no such file"


def test_malformed_yaml_names_the_line(capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("lora_r: 8\nlearning_rate: [1e-4\n")
    line = error_line(capsys, sft_arguments(), ["--config", str(config)])
    assert line.startswith(f"error: --config {config}: not valid YAML (line ") and "fix the file" in line


def test_yaml_that_is_not_a_mapping(capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("- lora_r\n- 8\n")
    assert "not a mapping of option: value" in error_line(capsys, sft_arguments(), ["--config", str(config)])


@pytest.mark.parametrize("argv, expected", [
    (["--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
    (["--eval_strategy", "sometimes"], "invalid choice: 'sometimes'"),
    (["--lora_r"], "argument --lora_r/--lora-r: expected one argument"),
])
def test_argparse_errors_are_one_line_without_the_usage(capsys, argv, expected):
    assert expected in error_line(capsys, sft_arguments(), [*SFT_CONFIG, *argv])


def test_a_library_check_in_post_init_is_one_line(capsys):
    # transformers' TrainingArguments.__post_init__ raises ValueError for this combination.
    line = error_line(capsys, sft_arguments(), [*SFT_CONFIG, "--load_best_model_at_end", "true",
                                                "--eval_strategy", "steps", "--save_strategy", "epoch"])
    assert "ValueError" not in line and "load_best_model_at_end" in line


# ---- paths ---------------------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    line = error_line(capsys, sft_arguments(), [*SFT_CONFIG, "--output_dir", str(target)])
    assert line == f"error: --output_dir {target}: is a file, not a folder; give a folder"


def test_output_dir_under_a_file(capsys, tmp_path):
    (tmp_path / "taken").write_text("x")
    line = error_line(capsys, sft_arguments(), [*SFT_CONFIG, "--output_dir", str(tmp_path / "taken" / "run")])
    assert f"{tmp_path / 'taken'} is a file" in line


def test_output_dir_not_writable_is_found_by_a_probe(capsys, tmp_path, monkeypatch):
    """The probe is a real file creation (root may write anywhere, so the refusal is simulated here)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    line = error_line(capsys, sft_arguments(), [*SFT_CONFIG, "--output_dir", str(tmp_path / "new" / "run")])
    assert line == (f"error: --output_dir {tmp_path / 'new' / 'run'}: cannot write in {tmp_path} (Permission denied); "
                    "choose a folder you can write to")


def test_output_dir_probe_leaves_nothing(tmp_path):
    arguments.check_output_writable(tmp_path / "a" / "b", "--output_dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, expected", [
    ("--model_name_or_path", "tests/nowhere-sft", "--model_name_or_path tests/nowhere-sft: no such folder"),
    ("--model_name_or_path", "my model", "--model_name_or_path my model: no such folder"),
    ("--dataset_name", "tests/no-such-data", "--dataset_name tests/no-such-data: no such file or folder"),
])
def test_relative_path_that_does_not_exist_is_no_such_folder(capsys, flag, value, expected):
    """A relative path whose first folder exists here (tests/), or a name no hub id can have, is a local path:
    "no such folder", not a network error."""
    assert expected in error_line(capsys, sft_arguments(), [*SFT_CONFIG, flag, value])


def test_plausible_hub_id_is_left_to_the_hub():
    assert data.looks_like_local_path("facebook/opt-350m") is False
    assert data.looks_like_local_path("Dahoas/rm-static") is False
    assert data.looks_like_local_path("./model") and data.looks_like_local_path("a/b/c")
    assert data.looks_like_local_path("tests/anything")  # tests/ is a folder here


# ---- the end-to-end guarantee -------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, argv, expected", [
    ("sft.py", [*SFT_CONFIG, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least"),
    pytest.param("ppo.py", ["--config", "recipes/demo/ppo.yaml", "--score_clip", "0"], "--score_clip 0.0: must be > 0",
                 marks=pytest.mark.slow),  # in-process above; here the whole script, as users run it
    ("evaluate.py", ["--policies", "a=b", "--max_prompts", "0"], "--max_prompts 0: must be at least 1"),
    ("chat.py", ["--model_path", "x", "--top_p", "2"], "--top_p 2.0: must be in (0, 1]"),
    ("train.py", ["--steps", "1", "--sft_argz", "--lora_r 4"], "unknown option --sft_argz; did you mean --sft_args?"),
])
def test_scripts_exit_2_with_one_line_and_write_nothing(script_env, tmp_path, script, argv, expected):
    out = tmp_path / "out"
    result = run(python_script(script, *argv, "--output_dir", out), script_env, check=False) if script != "chat.py" \
        else run(python_script(script, *argv), script_env, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors == [f"error: {expected}"] or (len(errors) == 1 and expected in errors[0]), result.stderr[-2000:]
    assert not out.exists()
