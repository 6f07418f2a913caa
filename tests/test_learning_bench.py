"""bench/learning.py: the commands it runs, the numbers it reads, and the table over seeds (no training here)."""

import json
import sys
from pathlib import Path

import pytest

from simple_rlhf import models, runs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import learning  # noqa: E402


def test_train_command_seeds_every_step_and_passes_the_extras_last(tmp_path):
    args = learning.LearningArguments(task="smollm2-synthetic", model_path=str(tmp_path),
                                      ppo_args="--max_steps 3 --advantage_estimator rloo")
    command = learning.train_command(args, 2, tmp_path / "seed-2")
    assert command[command.index("--preset") + 1] == "smollm2"
    assert command[command.index("--accelerate_config") + 1] == "none"
    for step in ("sft", "reward", "ppo"):
        extra = command[command.index(f"--{step}_args") + 1]
        assert extra.startswith("--seed 2 --dataset_name builtin:synthetic")
    assert f"--model_name_or_path {tmp_path}" in command[command.index("--sft_args") + 1]
    # The reward model starts from the SFT output (train.py wires it), not from the base model.
    assert "--model_name_or_path" not in command[command.index("--reward_args") + 1]
    assert command[command.index("--ppo_args") + 1].endswith("--max_steps 3 --advantage_estimator rloo")
    assert "--force" not in command


def test_eval_command_compares_base_sft_and_ppo(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S"}, {"step": "reward", "output": "R"}, {"step": "ppo", "output": "P"}]}))
    command = learning.eval_command(learning.LearningArguments(task="demo", eval_args="--temperature 0.7"), tmp_path)
    policies = command[command.index("--policies") + 1 : command.index("--max_prompts")]
    assert policies == [f"base={models.BUILTIN_MODEL}", "sft=S", "ppo=P"]
    assert command[command.index("--reward_model_path") + 1] == "R" and command[-2:] == ["--temperature", "0.7"]


@pytest.mark.parametrize("args, message", [
    (dict(task="nope"), "--task nope: use one of demo, smollm2-synthetic, smollm2-hh"),
    (dict(seeds=0), "--seeds 0: must be at least 1"),
    (dict(task="smollm2-synthetic", model_path="/no/such/folder"), "--model_path /no/such/folder: no such folder"),
    (dict(ppo_args="--x 'open"), "--ppo_args"),
    (dict(estimators="rloo,ppo"), "--estimators rloo,ppo: ppo is not one of gae, rloo, grpo"),
    (dict(best_of_n=-2), "--best_of_n -2: must be at least 0 (0: off)"),
    (dict(seeds=2, start_seed=3), "--start_seed 3: must be between 1 and --seeds 2"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        learning.main(learning.LearningArguments(**args))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_seed_numbers_and_the_table_over_seeds(tmp_path):
    def seed(folder, both_sft, both_ppo, accuracy):
        (folder / "eval").mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"steps": [
            {"step": "sft", "duration_s": 10.0}, {"step": "reward", "duration_s": 20.0},
            {"step": "ppo", "duration_s": 30.0}]}))
        policy = lambda both: {"both_rate": both, "correct_rate": both, "polite_rate": 1.0, "kl_to_reference": 0.5,
                               "mean_length": 9.0, "eos_rate": 1.0}
        (folder / "eval" / "eval_results.json").write_text(json.dumps({
            "reward": {"eval_accuracy": accuracy, "accuracy_by_flaw": {"wrong": accuracy, "rude": 1.0}},
            "policies": {"base": policy(0.0), "sft": policy(both_sft), "ppo": policy(both_ppo)}}))
        return learning.seed_numbers(learning.LearningArguments(), folder, 5.0)

    per_seed = [seed(tmp_path / "1", 0.5, 0.7, 0.8), seed(tmp_path / "2", 0.5, 0.9, 0.9)]
    assert per_seed[0]["reward accuracy, rejected wrong"] == 0.8
    assert per_seed[1]["ppo - sft both_rate"] == pytest.approx(0.4)
    assert per_seed[0]["time ppo (s)"] == 30.0 and per_seed[0]["time evaluation (s)"] == 5.0
    rows = {row[0]: row[1:] for row in learning.summarise(per_seed)}
    assert rows["quantity"] == ["mean ± std", "seed 1", "seed 2"]
    assert rows["ppo - sft both_rate"] == ["0.300 ± 0.141", "0.200", "0.400"]
    assert rows["time sft (s)"] == ["10.0 ± 0.0", "10.0", "10.0"]
    assert learning.summarise(per_seed, first_seed=2)[0] == ["quantity", "mean ± std", "seed 2", "seed 3"]


def test_estimators_each_get_a_ppo_run_on_the_same_models_and_join_the_evaluation(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S", "duration_s": 1.0}, {"step": "reward", "output": "R", "duration_s": 2.0},
        {"step": "ppo", "output": "P", "duration_s": 3.0}]}))
    args = learning.LearningArguments(task="smollm2-synthetic", estimators="gae, grpo", ppo_args="--max_steps 3")
    command = learning.extra_command(args, 2, tmp_path, "ppo-grpo", tmp_path / "ppo-grpo")
    assert command[command.index("--config") + 1].endswith("recipes/smollm2/ppo.yaml")
    assert [command[command.index(flag) + 1] for flag in ("--sft_model_path", "--reward_model_path", "--seed")] == \
           ["S", "R", "2"]
    assert command[command.index("--output_dir") + 1] == str(tmp_path / "ppo-grpo")
    assert command[-4:] == ["--max_steps", "3", "--advantage_estimator", "grpo"]  # the estimator has the last word
    (tmp_path / "ppo-grpo").mkdir()  # an attempt that left no checkpoint is replaced, one with a checkpoint resumed
    assert learning.extra_command(args, 2, tmp_path, "ppo-grpo", tmp_path / "ppo-grpo")[-2:] == ["--overwrite_output_dir", "true"]
    (tmp_path / "ppo-grpo" / "checkpoint-2").mkdir()
    (tmp_path / "ppo-grpo" / "checkpoint-2" / runs.CHECKPOINT_COMPLETE).write_text("{}")
    assert learning.extra_command(args, 2, tmp_path, "ppo-grpo", tmp_path / "ppo-grpo")[-2:] == ["--resume_from_checkpoint", "true"]

    policies = learning.eval_command(args, tmp_path)
    policies = policies[policies.index("--policies") + 1 : policies.index("--max_prompts")]
    assert policies[1:] == ["sft=S", "ppo=P", f"ppo-gae={tmp_path / 'ppo-gae'}", f"ppo-grpo={tmp_path / 'ppo-grpo'}"]

    rate = lambda both: {"both_rate": both, "kl_to_reference": 1.0}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps({"reward": {"eval_accuracy": 0.9}, "policies": {
        "base": rate(0.0), "sft": rate(0.5), "ppo": rate(0.6), "ppo-gae": rate(0.7), "ppo-grpo": rate(0.4)}}))
    for estimator, seconds in (("gae", 40.0), ("grpo", 30.0)):
        (tmp_path / f"ppo-{estimator}" / "bench_done.json").parent.mkdir(exist_ok=True)
        (tmp_path / f"ppo-{estimator}" / "bench_done.json").write_text(json.dumps({"duration_s": seconds}))
    numbers = learning.seed_numbers(args, tmp_path, 5.0)
    assert numbers["ppo-gae - sft both_rate"] == pytest.approx(0.2)
    assert numbers["ppo-grpo - sft both_rate"] == pytest.approx(-0.1)
    assert numbers["time ppo-gae (s)"] == 40.0 and numbers["ppo-grpo kl_to_reference"] == 1.0


def test_truth_and_dpo_runs_join_the_evaluation_with_the_ground_truth_as_reward(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S", "duration_s": 1.0}, {"step": "reward", "output": "R", "duration_s": 2.0},
        {"step": "ppo", "output": "P", "duration_s": 3.0}]}))
    args = learning.LearningArguments(task="smollm2-synthetic", estimators="rloo", reward_sources="model,truth",
                                      methods="ppo,dpo", dpo_args="--beta 0.2")
    assert learning.extra_runs(args) == ["ppo-rloo", "ppo-rloo-truth", "dpo"]
    truth = learning.extra_command(args, 1, tmp_path, "ppo-rloo-truth", tmp_path / "ppo-rloo-truth")
    assert truth[truth.index("--reward_model_path") + 1] == "none"
    assert truth[truth.index("--reward_funcs") + 1] == "builtin:synthetic" and "--reward_weights" not in truth
    # the ground truth cannot be over-optimised: its runs drop the recipe's KL budget and go on longer
    assert truth[truth.index("--kl_budget") + 1] == "0" and truth[truth.index("--max_steps") + 1] == "50"
    model = learning.extra_command(args, 1, tmp_path, "ppo-rloo", tmp_path / "ppo-rloo")
    assert "--kl_budget" not in model and "--max_steps" not in model
    assert model[model.index("--reward_model_path") + 1] == "R"  # the proxy, with the gold logged at weight 0
    assert model[model.index("--reward_weights") + 1:model.index("--reward_weights") + 3] == ["1", "0"]
    dpo = learning.extra_command(args, 1, tmp_path, "dpo", tmp_path / "dpo")
    assert dpo[1].endswith("dpo.py") and dpo[dpo.index("--model_name_or_path") + 1] == "S" and dpo[-2:] == [
        "--beta", "0.2"]
    assert "--reward_weights" in learning.train_command(args, 1, tmp_path)[-1]  # the recipe's PPO logs the gold too
    assert learning.extra_runs(learning.LearningArguments(task="demo", reward_sources="truth")) == ["ppo-truth"]
    policies = learning.eval_command(args, tmp_path)
    assert f"dpo={tmp_path / 'dpo'}" in policies and f"ppo-rloo-truth={tmp_path / 'ppo-rloo-truth'}" in policies
    with pytest.raises(SystemExit):
        learning.main(learning.LearningArguments(task="smollm2-hh", reward_sources="truth"))


def test_estimator_run_trained_again_replaces_the_finished_one_only_once_it_finished(tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S"}, {"step": "reward", "output": "R"}, {"step": "ppo", "output": "P"}]}))
    finished = tmp_path / "ppo-rloo"
    finished.mkdir()
    (finished / "bench_done.json").write_text(json.dumps({"duration_s": 1.0}))
    (finished / "adapter_model.safetensors").write_text("old")
    args = learning.LearningArguments(task="smollm2-synthetic", estimators="rloo", force=True)

    def failing_run(command, log):
        assert command[command.index("--output_dir") + 1] == str(tmp_path / "ppo-rloo.new")
        assert (finished / "adapter_model.safetensors").read_text() == "old"  # untouched while the new one trains
        raise SystemExit(1)

    monkeypatch.setattr(learning, "run", failing_run)
    with pytest.raises(SystemExit):
        learning.run_extras(args, 1, tmp_path)
    assert (finished / "adapter_model.safetensors").read_text() == "old"

    def good_run(command, log):
        out = Path(command[command.index("--output_dir") + 1])
        out.mkdir()
        (out / "adapter_model.safetensors").write_text("new")
        return 7.0

    monkeypatch.setattr(learning, "run", good_run)
    learning.run_extras(args, 1, tmp_path)
    assert (finished / "adapter_model.safetensors").read_text() == "new"
    assert json.loads((finished / "bench_done.json").read_text()) == {"duration_s": 7.0}
    assert not (tmp_path / "ppo-rloo.new").exists()


def test_best_of_n_goes_to_the_evaluation_and_its_row_and_rm_auc_join_the_table(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S", "duration_s": 1.0}, {"step": "reward", "output": "R", "duration_s": 2.0},
        {"step": "ppo", "output": "P", "duration_s": 3.0}]}))

    def best_of_n_flag(**options):
        command = learning.eval_command(learning.LearningArguments(**options), tmp_path)
        return command[command.index("--best_of_n") + 1] if "--best_of_n" in command else None

    assert best_of_n_flag(task="demo") == "4" and best_of_n_flag(task="smollm2-synthetic", model_path="M") == "16"
    assert best_of_n_flag(task="demo", best_of_n=8) == "8" and best_of_n_flag(task="demo", best_of_n=0) is None
    command = learning.eval_command(learning.LearningArguments(task="demo", eval_args="--best_of_n 2"), tmp_path)
    assert command[-2:] == ["--best_of_n", "2"]  # the user's --eval_args have the last word

    def seed(folder, sft_auc, best_auc):
        (folder / "eval").mkdir(parents=True)
        (folder / "summary.json").write_text((tmp_path / "summary.json").read_text())
        policy = lambda both, auc: {"both_rate": both, "rm_auc": auc, "rm_auc_correct": auc, "kl_to_reference": 0.5}
        best = {"both_rate": 0.4, "rm_auc": best_auc, "rm_auc_correct": 0.9, "best_of": "sft", "best_of_n": 4,
                "kl_to_reference_bound": 0.636, "win_rate_vs_sft": 0.8}
        (folder / "eval" / "eval_results.json").write_text(json.dumps({"reward": {"eval_accuracy": 0.8}, "policies": {
            "base": policy(0.0, None), "sft": policy(0.2, sft_auc), "ppo": policy(0.1, 0.5), "sft-best-of-4": best}}))
        return learning.seed_numbers(learning.LearningArguments(task="demo"), folder, 5.0)

    per_seed = [seed(tmp_path / "1", 0.8, None), seed(tmp_path / "2", 0.6, 0.7)]
    assert per_seed[0]["sft-best-of-4 - sft both_rate"] == pytest.approx(0.2)
    assert per_seed[0]["sft-best-of-4 kl_to_reference_bound"] == 0.636 and per_seed[0]["base rm_auc"] is None
    rows = {row[0]: row[1:] for row in learning.summarise(per_seed)}
    assert rows["sft rm_auc"] == ["0.700 ± 0.141", "0.800", "0.600"]
    assert rows["sft-best-of-4 rm_auc"] == ["0.700 ± 0.000", "-", "0.700"]  # over the seeds that have one
    assert rows["base rm_auc"] == ["-", "-", "-"]
    assert rows["sft-best-of-4 win_rate_vs_sft"] == ["0.800 ± 0.000", "0.800", "0.800"]
    names = [row[0] for row in learning.summarise(per_seed)]
    assert names.index("sft-best-of-4 both_rate") > names.index("ppo both_rate")  # after the trained policies


def test_greedy_evaluates_the_sft_and_trained_policies_at_temperature_near_zero(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": [
        {"step": "sft", "output": "S", "duration_s": 1.0}, {"step": "reward", "output": "R", "duration_s": 2.0},
        {"step": "ppo", "output": "P", "duration_s": 3.0}]}))
    args = learning.LearningArguments(task="smollm2-synthetic", reward_sources="truth", greedy=True, best_of_n=8)
    sampled, greedy = learning.eval_command(args, tmp_path), learning.eval_command(args, tmp_path, greedy=True)
    assert sampled[sampled.index("--output_dir") + 1] == str(tmp_path / "eval") and "--best_of_n" in sampled
    assert greedy[greedy.index("--policies") + 1: greedy.index("--max_prompts")] == [
        "sft=S", "ppo=P", f"ppo-truth={tmp_path / 'ppo-truth'}"]  # no base, no best-of-N
    assert greedy[greedy.index("--temperature") + 1] == "0.01" and "--best_of_n" not in greedy
    assert greedy[greedy.index("--output_dir") + 1] == str(tmp_path / "eval-greedy")

    rate = lambda both: {"both_rate": both, "correct_rate": both + 0.1}
    for folder, rates in (("eval", {"base": 0.0, "sft": 0.4, "ppo": 0.5, "ppo-truth": 0.7}),
                          ("eval-greedy", {"sft": 0.6, "ppo": 0.5, "ppo-truth": 0.8})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "eval_results.json").write_text(json.dumps({
            "reward": {"eval_accuracy": 0.9}, "policies": {name: rate(both) for name, both in rates.items()}}))
    (tmp_path / "ppo-truth").mkdir()
    (tmp_path / "ppo-truth" / "bench_done.json").write_text(json.dumps({"duration_s": 4.0}))
    numbers = learning.seed_numbers(args, tmp_path, 5.0)
    assert numbers["ppo-truth - sft both_rate"] == pytest.approx(0.3)  # sampled
    assert numbers["greedy sft both_rate"] == 0.6 and numbers["greedy ppo correct_rate"] == pytest.approx(0.6)
    assert numbers["greedy ppo - sft both_rate"] == pytest.approx(-0.1)
    assert numbers["greedy ppo-truth - sft both_rate"] == pytest.approx(0.2)
    assert "greedy base both_rate" not in numbers
