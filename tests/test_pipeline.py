"""train.py end to end on the demo preset (one shared run), and evaluate.py, chat.py and the charts on its outputs.

The shared run uses plain python (`--accelerate_config none`) and small per-step arguments to stay quick; the
DeepSpeed launch path is tested in test_sft_reward.py and test_ppo.py.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, python_script, run

from simple_rlhf import data, errors, plots

QUICK = ["--sft_args", "--max_train_samples 400 --num_train_epochs 1 --max_eval_samples 64 --eval_steps 10 "
                       "--save_steps 20",
         "--reward_args", "--max_train_samples 400 --num_train_epochs 1 --max_eval_samples 64 --eval_steps 10 "
                          "--save_steps 20 --logging_steps 5",
         "--ppo_args", "--max_steps 8 --save_steps 4 --max_train_samples 256"]
STEPS = ("sft", "reward", "ppo")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train(root, *extra):
    # Later flags win, so `extra` may override QUICK's per-step arguments.
    return python_script("train.py", "--preset", "demo", "--output_dir", root, "--accelerate_config", "none",
                         *QUICK, *extra)


@pytest.fixture(scope="session")
def env(script_env):
    return {**script_env, "OMP_NUM_THREADS": "1"}  # tiny models: one thread per process is fastest on small CPUs


@pytest.fixture(scope="session")
def demo_run(env, tmp_path_factory):
    """All three steps through train.py; the summary is read right away (the re-run test rewrites it)."""
    root = tmp_path_factory.mktemp("pipeline")
    result = run(train(root), env)
    return root, result, json.loads((root / "summary.json").read_text())


def test_pipeline_runs_the_three_steps_wired_together_and_summarises(demo_run):
    root, result, summary = demo_run
    steps = {entry["step"]: entry for entry in summary["steps"]}
    assert list(steps) == list(STEPS) and all(e["status"] == "ran" and e["duration_s"] > 0 for e in steps.values())
    sft, reward, ppo = steps["sft"]["metrics"], steps["reward"]["metrics"], steps["ppo"]["metrics"]
    assert math.isfinite(sft["eval_perplexity"]) and 1 < sft["eval_perplexity"] < 50
    # Wiring only: 25 reward steps on 400 pairs stay near chance (60% of the rejected answers are wrong but polite);
    # that the reward step learns is tested on the demo recipe in test_sft_reward.py.
    assert 0 <= reward["eval_accuracy"] <= 1 and math.isfinite(reward["eval_margin"])
    assert ppo["steps"] == 8 and all(math.isfinite(ppo[k]) for k in ("score_start", "score_end", "kl_end"))
    # The outputs are wired: reward.py starts from the SFT output, ppo.py gets both.
    assert steps["reward"]["command"][steps["reward"]["command"].index("--model_name_or_path") + 1] == str(root / "sft")
    ppo_command = steps["ppo"]["command"]
    assert ppo_command[ppo_command.index("--sft_model_path") + 1] == str(root / "sft")
    assert ppo_command[ppo_command.index("--reward_model_path") + 1] == str(root / "reward")
    # The table on screen, the streamed and prefixed step output, the logs and the done markers.
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step ") and "headline" in line)
    table = "\n".join(lines[header : header + 5])
    assert "eval perplexity" in table and "eval accuracy" in table and " -> " in table and "KL" in table
    for name, done_line in zip(STEPS, ("SFT done", "Reward model done", "PPO done")):
        assert f"[{name}] {done_line}" in result.stdout
        assert done_line in (root / "logs" / f"{name}.log").read_text()
        assert json.loads((root / name / "step_complete.json").read_text())["metrics"] == steps[name]["metrics"]


def test_rerun_skips_the_finished_steps(demo_run, env):
    root = demo_run[0]
    logs = {name: (root / "logs" / f"{name}.log").read_text() for name in STEPS}
    started = time.time()
    result = run(train(root), env)
    assert time.time() - started < 30
    for name in STEPS:
        assert f"[{name}] skipped" in result.stdout
        assert (root / "logs" / f"{name}.log").read_text() == logs[name]  # nothing was launched
    summary = json.loads((root / "summary.json").read_text())
    assert [e["status"] for e in summary["steps"]] == ["skipped"] * 3
    assert summary["steps"][0]["metrics"] == demo_run[2]["steps"][0]["metrics"]


@pytest.mark.slow
def test_a_killed_step_resumes_from_its_checkpoint_and_later_steps_are_redone(demo_run, env, tmp_path):
    root = tmp_path / "resume"
    for name in ("sft", "reward"):  # steps 1 and 2 finished: only step 3 runs
        shutil.copytree(demo_run[0] / name, root / name)
    long_ppo = ["--steps", "3", "--ppo_args", "--max_steps 400 --save_steps 2 --max_train_samples 256"]
    process = subprocess.Popen([str(a) for a in train(root, *long_ppo)], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((root / "ppo").glob("checkpoint-*/checkpoint_complete.json")):
            assert process.poll() is None and time.time() < deadline, "ppo.py wrote no checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # train.py and its step, as a crash or an OOM kill would
        process.wait()
    assert not (root / "ppo" / "step_complete.json").exists()

    result = run(train(root, "--steps", "3", "--ppo_args", "--max_steps 8 --save_steps 2 --max_train_samples 256"),
                 env)
    assert "[ppo] resuming the interrupted step from" in result.stdout
    log = (root / "logs" / "ppo.log").read_text().split("\n===== ")[-1]  # this run's part of the log
    assert "--resume_from_checkpoint true" in log and "resumed from" in log
    steps = [json.loads(line)["step"] for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert (root / "ppo" / "step_complete.json").exists() and (root / "ppo" / "adapter_config.json").exists()

    # Step 2 interrupted again (no done marker, checkpoints left): it resumes, and the finished step 3, trained on
    # the old reward model, is trained again from scratch.
    (root / "reward" / "step_complete.json").unlink()
    result = run(train(root, "--steps", "2", "3"), env)
    assert "[reward] resuming the interrupted step from" in result.stdout
    assert "[ppo] running again from scratch: step reward before it was re-run" in result.stdout
    assert "resumed from" not in (root / "logs" / "ppo.log").read_text().split("\n===== ")[-1]
    summary = json.loads((root / "summary.json").read_text())
    assert [(e["step"], e["status"]) for e in summary["steps"]] == [("reward", "ran"), ("ppo", "ran")]


@pytest.mark.slow  # a training run: the slow tier
def test_a_failing_step_stops_the_pipeline_with_its_exit_code_and_log_tail(env, tmp_path):
    result = run(train(tmp_path, "--sft_args", "--max_length 2"), env, check=False)
    assert result.returncode == 2
    assert "step 1 (sft) failed with exit code 2" in result.stderr
    assert "error: max_length=2 is too small" in result.stderr  # the step's own error line, from its log tail
    assert not (tmp_path / "reward").exists() and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "sft" / "step_complete.json").exists()


def test_bad_pipeline_arguments_are_one_line_errors(env, tmp_path):
    for args, expected in ((["--preset", "nope"], "--preset nope: no folder recipes/nope"),
                           (["--steps", "4"], "--steps 4: give some of 1 (sft), 2 (reward), 3 (ppo)"),
                           (["--steps", "3"], "holds no finished sft step")):
        result = run(train(tmp_path / "bad", *args), env, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_evaluate_reports_sane_numbers_on_the_demo_outputs(demo_run, env, tmp_path):
    root = demo_run[0]
    result = run(python_script("evaluate.py", "--dataset_name", "builtin:synthetic", "--max_eval_samples", "64",
                               "--sft_model_path", root / "sft", "--reward_model_path", root / "reward",
                               "--policies", f"sft={root / 'sft'}", f"ppo={root / 'ppo'}", "--max_prompts", "16",
                               "--response_length", "12", "--show", "2", "--output_dir", tmp_path), env)
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert math.isfinite(results["sft"]["eval_perplexity"]) and results["sft"]["eval_perplexity"] > 1
    # The same eval rows and quantity as sft.py's final evaluation.
    assert results["sft"]["eval_perplexity"] == pytest.approx(demo_run[2]["steps"][0]["metrics"]["eval_perplexity"],
                                                              rel=0.02)
    assert 0 <= results["reward"]["eval_accuracy"] <= 1 and math.isfinite(results["reward"]["eval_margin"])
    sft, ppo = results["policies"]["sft"], results["policies"]["ppo"]
    assert sft["kl_to_reference"] == 0 and sft["win_rate_vs_sft"] == 0.5  # the reference against itself
    assert math.isfinite(ppo["kl_to_reference"]) and 0 <= ppo["win_rate_vs_sft"] <= 1
    for policy in (sft, ppo):
        assert 0 <= policy["eos_rate"] <= 1 and 0 < policy["mean_length"] <= 12 and math.isfinite(policy["reward_mean"])
    assert "win_rate_vs_sft" in result.stdout and result.stdout.count("========== prompt") == 2


def test_evaluate_rejects_a_malformed_policy(tmp_path, capsys):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:  # in-process: the check runs before any model or data is loaded
        evaluate.main(evaluate.EvalArguments(policies=["sft"], output_dir=str(tmp_path)), data.DataArguments())
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --policies sft: write each policy as name=path, e.g. sft=out/demo/sft\n"
    assert not (tmp_path / "eval_results.json").exists()


def test_chat_answers_a_prompt_with_the_demo_actor(demo_run, env):
    result = run(python_script("chat.py", "--model_path", demo_run[0] / "ppo", "--prompt", "What is 2 plus 3?",
                               "--max_new_tokens", "16", "--seed", "0"), env)
    answer = result.stdout.strip()
    assert answer and "Human:" not in answer and "Assistant:" not in answer


def test_chat_interactive_turns_clear_and_quit(demo_run, env):
    result = subprocess.run([str(a) for a in python_script("chat.py", "--model_path", demo_run[0] / "sft",
                                                            "--greedy", "true", "--max_new_tokens", "12")],
                            cwd=ROOT, env=env, input="What color is grass?\nclear\nWhat is 2 plus 3?\nquit\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    replies = [line for line in result.stdout.splitlines() if line.startswith("Assistant: ")]
    assert len(replies) == 2 and all(len(r) > len("Assistant: ") for r in replies)
    assert "(conversation cleared)" in result.stdout


def test_chat_builds_the_conversation_in_the_data_format():
    import chat

    text = chat.build_prompt(None, [("What is 1 plus 5?", "6.")], "And 2 plus 2?", use_template=False)
    assert text == "\n\nHuman: What is 1 plus 5?\n\nAssistant: 6.\n\nHuman: And 2 plus 2?\n\nAssistant:"


def test_charts_are_written_and_are_valid_pngs(demo_run):
    from matplotlib import image

    root = demo_run[0]
    expected_size = {"sft": (272, 672), "reward": (272, 1008), "ppo": (490, 1120)}  # figsize * dpi in plots.py
    for name in STEPS:
        for path in (root / "plots" / f"{name}_curves.png", root / name / f"{name}_curves.png"):
            assert path.read_bytes()[:8] == PNG_SIGNATURE, path
            assert image.imread(path).shape[:2] == expected_size[name], path
    for name in ("sft", "reward"):  # the steps save their full log history for the charts
        history = json.loads((root / name / "trainer_state.json").read_text())["log_history"]
        assert any("eval_loss" in entry for entry in history)
    assert [e["plot"] for e in demo_run[2]["steps"]] == [str(root / "plots" / f"{n}_curves.png") for n in STEPS]


def test_ppo_chart_of_a_critic_free_run_has_no_value_panels(tmp_path):
    from matplotlib import image

    gae = {"objective/scores": 1.0, "objective/kl": 0.1, "loss/policy_avg": 0.2, "loss/value_avg": 0.3,
           "val/clipfrac_avg": 0.0, "policy/clipfrac_avg": 0.1}
    for name, keys in (("gae", list(gae)), ("rloo", [k for k in gae if not k.startswith(("loss/value", "val/"))])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": step, **{k: gae[k] * step for k in keys}}) + "\n" for step in range(1, 4)))
    widths = {name: image.imread(plots.plot_ppo(tmp_path / name)).shape[1] for name in ("gae", "rloo")}
    assert widths == {"gae": 3 * 4 * 70, "rloo": 2 * 4 * 70}  # 6 panels in 3 columns, 4 panels in 2 (figsize * dpi)


def test_ema_smoothing_starts_at_the_data_and_follows_it():
    assert plots.ema([3.0, 3.0, 3.0], 0.1) == pytest.approx([3.0, 3.0, 3.0])
    assert plots.ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_wiring_of_the_opt_presets_reward_model(tmp_path):
    import train

    for step in ("sft", "reward"):  # finished outputs: the SFT step with a merged model, as the opt-1.3b recipe writes
        (tmp_path / step / ("merged" if step == "sft" else "")).mkdir(parents=True, exist_ok=True)
        (tmp_path / step / ("merged" if step == "sft" else "") / "config.json").write_text("{}")
    extra = {"sft": [], "reward": [], "ppo": ["--max_steps", "5"]}

    def command(step, **options):
        args = train.TrainArguments(preset="opt-1.3b", accelerate_config="none", **options)
        return train.step_command(args, step, tmp_path, extra, resume=False)

    assert "--model_name_or_path" not in command("reward")  # the recipe's OPT-350m
    bigger = command("reward", reward_model="facebook/opt-1.3b")
    assert bigger[-4:] == ["--model_name_or_path", "facebook/opt-1.3b", "--use_peft", "true"]
    assert command("reward", reward_model="sft")[-2:] == ["--model_name_or_path", str(tmp_path / "sft" / "merged")]
    ppo = command("ppo")
    assert ppo[ppo.index("--sft_model_path") + 1] == str(tmp_path / "sft" / "merged")
    assert ppo[ppo.index("--reward_model_path") + 1] == str(tmp_path / "reward")
    assert ppo[-2:] == ["--max_steps", "5"]  # the user's extra arguments come last, so they win


def test_the_dpo_method_wires_sft_into_dpo_and_checks_its_steps(tmp_path):
    import train

    (tmp_path / "sft" / "merged").mkdir(parents=True)
    (tmp_path / "sft" / "merged" / "config.json").write_text("{}")
    args = train.TrainArguments(preset="demo", method="dpo", accelerate_config="none", dpo_args="--beta 0.2")
    extra = train.validate(args)
    assert args.steps == [1, 2] and extra["dpo"] == ["--beta", "0.2"]
    command = train.step_command(args, "dpo", tmp_path, extra, resume=False)
    assert command[1].endswith("dpo.py") and command[command.index("--config") + 1].endswith("recipes/demo/dpo.yaml")
    assert command[command.index("--model_name_or_path") + 1] == str(tmp_path / "sft" / "merged")
    assert command[-2:] == ["--beta", "0.2"]
    for options, message in (({"steps": [3]}, "--steps 3: give some of 1 (sft), 2 (dpo) (--method dpo)"),
                             ({"method": "grpo"}, "--method grpo: use ppo")):
        with pytest.raises(errors.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train.validate(train.TrainArguments(**{"preset": "demo", "method": "dpo", **options}))


@pytest.mark.slow
def test_the_pipeline_with_method_dpo_runs_sft_then_dpo(env, tmp_path):
    result = run(python_script("train.py", "--preset", "demo", "--method", "dpo", "--output_dir", tmp_path,
                               "--accelerate_config", "none", "--sft_args", QUICK[1], "--dpo_args",
                               "--max_train_samples 400 --max_steps 20 --eval_steps 10 --save_steps 10"), env)
    summary = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [row["step"] for row in summary] == ["sft", "dpo"] and all(row["status"] == "ran" for row in summary)
    dpo = summary[1]["metrics"]
    assert 0 <= dpo["eval_rewards/accuracies"] <= 1 and dpo["eval_loss"] < math.log(2)
    assert "eval reward accuracy" in result.stdout and (tmp_path / "plots" / "dpo_curves.png").exists()
    assert not (tmp_path / "reward").exists() and not (tmp_path / "ppo").exists()
