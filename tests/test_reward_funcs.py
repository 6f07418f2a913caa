"""ppo.py --reward_funcs / --reward_weights: reward functions beside (or instead of) the reward model (issue 16)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import python_script, run

from simple_rlhf import rewards, rollout, synthetic
from simple_rlhf.errors import UserError

TINY = ["--dataset_name", "builtin:synthetic", "--max_prompt_length", "64", "--response_length", "6",
        "--per_device_train_batch_size", "4", "--num_ppo_epochs", "1", "--use_peft", "true", "--lora_r", "4",
        "--learning_rate", "1e-3", "--max_train_samples", "16", "--sample_every", "0", "--report_to", "none",
        "--max_steps", "2"]

USER_FILE = '''
def length_reward(prompts, completions, **columns):
    """A user's reward: shorter answers are better; and it can read the dataset's other columns."""
    assert "chosen" in columns and len(columns["chosen"]) == len(completions)
    return [-len(c) / 10 for c in completions]


def wrong_length(prompts, completions, **columns):
    return [1.0]


def not_a_number(prompts, completions, **columns):
    return ["good" for _ in completions]


def gives_nan(prompts, completions, **columns):
    return [float("nan") for _ in completions]


def no_completions(prompts):
    return []


def needs_reference(prompts, completions, reference):
    return [0.0 for _ in completions]
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# loading, calling and combining (no model)
# ---------------------------------------------------------------------------------------------------------------
def test_builtin_synthetic_is_the_ground_truth():
    row = synthetic.synthetic_preference_rows(1, 5)[0]
    reward = rewards.load_reward_function("builtin:synthetic")
    right, wrong = rewards.call(reward, [row["prompt"]] * 2, [row["chosen"], row["rejected"]], [row, row]).tolist()
    truth = synthetic.check_synthetic_answer(row["prompt"], row["rejected"])
    assert right == 1.5 and wrong == float(truth["correct"]) + 0.5 * float(truth["polite"]) < 1.5


def test_a_user_file_function_gets_prompts_completions_and_columns(user_file):
    reward = rewards.load_reward_function(f"{user_file}:length_reward")
    values = rewards.call(reward, ["p1", "p2"], ["short", "a longer one"], [{"prompt": "p1", "chosen": "x"},
                                                                            {"prompt": "p2", "chosen": "y"}])
    assert values.tolist() == pytest.approx([-0.5, -1.2])


def test_a_module_function_is_loaded_by_its_dotted_name(tmp_path, monkeypatch, user_file):
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.load_reward_function("my_rewards:length_reward").name == "length_reward"
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, message", [
    ("nofile.py:f", "no such file nofile.py"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("{file}:missing", "has no function 'missing' (it has gives_nan, length_reward"),
    ("{file}:no_completions", "must take prompts and completions by name"),
    ("builtin:nope", "no such built-in reward; the built-ins are builtin:synthetic"),
    ("just_a_name", "write module:function, path/to/file.py:function or builtin:synthetic"),
])
def test_bad_reward_functions_are_one_line_before_any_model_loads(user_file, spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        rewards.load_reward_function(spec.format(file=user_file))


@pytest.mark.parametrize("name, message", [
    ("wrong_length", "returned 1 value\\(s\\) for 2 completions"),
    ("not_a_number", "value 0 is 'good' \\(str\\), not a number"),
    ("gives_nan", "value 0 is nan for the completion 'a'"),
])
def test_bad_reward_values_name_the_function_and_the_position(user_file, name, message):
    reward = rewards.load_reward_function(f"{user_file}:{name}")
    with pytest.raises(UserError, match=f"--reward_funcs {user_file}:{name}: .*{message}"):
        rewards.call(reward, ["p", "q"], ["a", "b"], [{"prompt": "p"}, {"prompt": "q"}])


def test_a_column_a_function_requires_must_be_in_the_data(user_file):
    reward = rewards.load_reward_function(f"{user_file}:needs_reference")
    with pytest.raises(UserError, match="needs the column\\(s\\) reference, which data.jsonl does not have"):
        rewards.check_columns([reward], ["prompt", "chosen"], "data.jsonl")
    rewards.check_columns([reward], ["prompt", "reference"], "data.jsonl")


def test_weights_one_per_source_model_first_and_zero_only_logs():
    names = rewards.source_names(True, [rewards.load_reward_function("builtin:synthetic")] * 2)
    assert names == ["model", "synthetic", "synthetic-2"]
    assert rewards.check_weights(None, names) == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="--reward_weights has 2 value\\(s\\) for 3 reward source\\(s\\)"):
        rewards.check_weights([1.0, 0.0], names)
    with pytest.raises(UserError, match="at least one not 0"):
        rewards.check_weights([0.0, 0.0, 0.0], names)
    with pytest.raises(UserError, match="no reward: give --reward_model_path, --reward_funcs, or both"):
        rewards.check_weights(None, [])
    per_source = {"model": torch.tensor([2.0, -1.0]), "synthetic": torch.tensor([1.5, math.nan])}
    assert rewards.combine(per_source, [1.0, 0.0]).tolist() == [2.0, -1.0]  # weight 0: logged, not optimised
    assert rewards.combine(per_source, [0.5, 2.0]).tolist() == [4.0, -0.5]  # None (NaN) adds nothing


def test_completions_are_the_answers_without_the_stop_token():
    from simple_rlhf import models

    tokenizer = models.load_tokenizer(models.resolve_model_path(models.BUILTIN_MODEL))
    answer = tokenizer(" Paris. I hope that helps!", add_special_tokens=False)["input_ids"]
    responses, mask, stopped = rollout.truncate_after_stop(
        torch.tensor([answer + [tokenizer.eos_token_id, 7], answer[:3] + [9] * (len(answer) - 1)]),
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    sample = rollout.Rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), responses, mask,
                             stopped)
    texts = rewards.completions_of(tokenizer, sample)
    assert texts[0] == " Paris. I hope that helps!" and texts[1].startswith(tokenizer.decode(answer[:3]))


# ---------------------------------------------------------------------------------------------------------------
# ppo.py end to end on the demo models
# ---------------------------------------------------------------------------------------------------------------
def ppo(demo_models, output_dir, *extra, reward=True):
    sft, reward_model = demo_models
    return python_script("ppo.py", *TINY, "--sft_model_path", sft, "--reward_model_path",
                         reward_model if reward else "none", "--output_dir", output_dir, *extra)


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "gae-full-fine-tuning"])
def test_ground_truth_alone_trains_every_estimator_without_a_reward_model(env, demo_models, tmp_path, estimator):
    out = tmp_path / estimator
    extra = [] if estimator.startswith("gae") else ["--advantage_estimator", estimator, "--num_generations", "2"]
    if estimator == "gae-full-fine-tuning":  # the critic: a full copy of the SFT backbone with a fresh value head
        extra = ["--use_peft", "false", "--learning_rate", "1e-5"]
    result = run(ppo(demo_models, out, "--reward_funcs", "builtin:synthetic", *extra, reward=False), env)
    history = metrics(out)
    assert [m["step"] for m in history] == [1, 2]
    # the score is the ground truth: 0, 0.5, 1 or 1.5 per answer
    assert all(m["rewards/synthetic"] == m["objective/scores"] and 0 <= m["objective/scores"] <= 1.5 for m in history)
    assert "rewards/model" not in history[0]
    gae = estimator.startswith("gae")
    assert (out / "critic").is_dir() == gae  # GAE's critic: the SFT backbone, a fresh value head
    assert "no reward model: the critic starts from the SFT policy" in result.stderr or not gae


def test_gold_logged_at_weight_zero_beside_the_proxy_and_a_user_file_weighed_in(env, demo_models, tmp_path,
                                                                                 user_file):
    out = tmp_path / "gold"
    run(ppo(demo_models, out, "--reward_funcs", "builtin:synthetic", f"{user_file}:length_reward",
            "--reward_weights", "1", "0", "0.5"), env)
    for m in metrics(out):
        assert {"rewards/model", "rewards/synthetic", "rewards/length_reward"} <= set(m)
        assert m["objective/scores"] == pytest.approx(m["rewards/model"] + 0.5 * m["rewards/length_reward"], abs=1e-4)
    assert (out / "ppo_curves.png").exists()


def test_a_bad_function_stops_before_any_model_loads_and_a_bad_value_at_the_first_iteration(env, demo_models,
                                                                                             tmp_path, user_file):
    out = tmp_path / "bad"
    result = run(ppo(demo_models, out, "--reward_funcs", f"{user_file}:missing"), env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --reward_funcs {user_file}:missing: ")
    assert not out.exists()
    result = run(ppo(demo_models, out, "--reward_funcs", f"{user_file}:not_a_number"), env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "value 0 is 'good' (str), not a number" in result.stderr.strip().splitlines()[-1]
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_reward_functions_resume_exactly(env, demo_models, tmp_path):
    """2 iterations + resume + 2 give the metrics of 4 straight (the sources are pure functions of the rollout)."""
    common = ["--reward_funcs", "builtin:synthetic", "--advantage_estimator", "rloo", "--num_generations", "2",
              "--save_steps", "2", "--lr_scheduler_type", "constant"]
    run(ppo(demo_models, tmp_path / "straight", *common, "--max_steps", "4", reward=False), env)
    run(ppo(demo_models, tmp_path / "resumed", *common, reward=False), env)
    run(ppo(demo_models, tmp_path / "resumed", *common, "--max_steps", "4", "--resume_from_checkpoint", "true",
            reward=False), env)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["rewards/synthetic"] == pytest.approx(b["rewards/synthetic"], abs=1e-6)
        assert a["objective/kl"] == pytest.approx(b["objective/kl"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_score_their_own_rows(env, demo_models, tmp_path, user_file):
    out = tmp_path / "ddp"
    sft, _ = demo_models
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "ppo.py", *TINY,
         "--sft_model_path", sft, "--reward_model_path", "none", "--reward_funcs", "builtin:synthetic",
         f"{user_file}:length_reward", "--reward_weights", "1", "0", "--advantage_estimator", "grpo",
         "--num_generations", "2", "--output_dir", out], env)
    history = metrics(out)
    assert [m["step"] for m in history] == [1, 2] and history[-1]["episode"] == 2 * 4 * 2
    assert all(m["objective/scores"] == pytest.approx(m["rewards/synthetic"]) for m in history)
    assert all(m["rewards/length_reward"] < 0 for m in history)
