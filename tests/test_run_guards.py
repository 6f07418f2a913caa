"""Runs that would mix or be kept by mistake: two runs into one output folder at once, a finished train.py step whose
arguments changed, an empty metrics.jsonl taken for a run, a step run from another folder than the user's."""

import json
import subprocess
import sys

import pytest

from simple_rlhf import arguments, runs
from simple_rlhf.errors import UserError
from conftest import ROOT

HOLD = "import sys, time; from simple_rlhf import runs; runs.lock_output_dir(sys.argv[1]); print('locked', flush=True); " \
       "time.sleep(60)"


@pytest.fixture
def held_by_another_process(script_env):
    """Lock a folder from another process (a run in progress), for as long as the test needs."""
    holders = []

    def hold(folder):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, env=script_env,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        holders.append(holder)
        return holder.pid

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


# ---- one run at a time in an output folder ---------------------------------------------------------------------------
def test_a_folder_in_use_by_another_run_is_refused(tmp_path, held_by_another_process):
    pid = held_by_another_process(tmp_path / "run")
    with pytest.raises(UserError) as error:
        runs.lock_output_dir(tmp_path / "run")
    assert str(error.value) == (f"--output_dir {tmp_path / 'run'} is in use by another run (pid {pid}); wait for it "
                                "or choose another --output_dir")


def test_the_lock_outlives_an_overwrite_and_goes_with_its_process(tmp_path, held_by_another_process, script_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    held_by_another_process(run_dir)
    runs.set_previous_run_aside(run_dir)  # what the holder does with --overwrite_output_dir: the folder is renamed
    with pytest.raises(UserError, match="is in use by another run"):
        runs.lock_output_dir(run_dir)
    # A process that locked and ended (here: normally) leaves nothing, and blocks nobody.
    subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(tmp_path / "other")], cwd=ROOT,
                   env=script_env, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run", "run.previous-run"]


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    (tmp_path / ".run.lock").write_text("99999999\n")  # a run killed with SIGKILL: its file stays, its lock does not
    runs.lock_output_dir(tmp_path / "run")
    assert (tmp_path / ".run.lock").read_text() == f"{__import__('os').getpid()}\n"
    runs.lock_output_dir(tmp_path / "run")  # this process holds it already: fine
    runs.unlock_output_dirs()
    assert not (tmp_path / ".run.lock").exists()


def test_only_the_main_process_locks(tmp_path, held_by_another_process, monkeypatch):
    held_by_another_process(tmp_path / "run")
    monkeypatch.setenv("RANK", "1")
    runs.lock_output_dir(tmp_path / "run")  # the other processes of a multi-process run leave it to process 0


@pytest.mark.parametrize("script", ["sft", "ppo"])
def test_the_steps_refuse_a_folder_in_use(script, tmp_path, held_by_another_process, reward_like_model, capsys):
    import importlib

    module = importlib.import_module(script)
    pid = held_by_another_process(tmp_path / "out")
    argv = ["--config", f"recipes/demo/{script}.yaml", "--output_dir", str(tmp_path / "out")]
    if script == "ppo":
        argv += ["--sft_model_path", "builtin:tiny-opt", "--reward_model_path", str(reward_like_model)]
    with pytest.raises(SystemExit) as exit_info:
        module.main(*arguments.parse_args(module.ARGUMENTS, argv))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --output_dir {tmp_path / 'out'} is in use by another run "
                                               f"(pid {pid}); wait for it or choose another --output_dir")


# ---- an empty metrics.jsonl is no run ---------------------------------------------------------------------------------
def test_an_empty_metrics_file_is_not_a_run(tmp_path):
    """What ppo.py leaves when it stops before its first step (e.g. its divergence guard): the corrected re-run
    into the same folder must not be refused as "already holds a run"."""
    (tmp_path / "metrics.jsonl").write_text("")
    assert runs.run_contents(tmp_path) == []
    runs.check_output_dir(tmp_path, overwrite=False, resume=None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match=r"already holds a run \(metrics.jsonl\)"):
        runs.check_output_dir(tmp_path, overwrite=False, resume=None)


# ---- train.py: changed arguments, the user's folder, one train.py per folder ---------------------------------------
@pytest.fixture
def pipeline(tmp_path, monkeypatch, script_env):
    """train.py in-process with a stand-in for each step (writes a final model), recording which steps ran."""
    import train

    ran = []

    def run_train(*argv):
        ran.clear()
        args = arguments.validate_args(train.ARGUMENTS, ["--preset", "demo", "--output_dir", str(tmp_path / "root"),
                                                         "--accelerate_config", "none", *argv])[0]
        train.main(args)
        return list(ran)

    def fake_step(name, command, log_path):
        output = command[command.index("--output_dir") + 1]
        (tmp_path / "root").mkdir(exist_ok=True)
        runs.write_json(f"{output}/config.json", {})
        ran.append(name)
        return 0, []

    run_train.real_run_step = train.run_step
    monkeypatch.setattr(train, "run_step", fake_step)
    monkeypatch.setattr(train, "collect_plot", lambda *args: None)

    return run_train


def test_a_finished_step_whose_arguments_changed_runs_again_with_the_steps_after_it(pipeline, capsys):
    assert pipeline("--ppo_args", "--max_steps 8") == ["sft", "reward", "ppo"]
    assert pipeline("--ppo_args", "--max_steps 8") == []  # the same arguments: all skipped
    assert pipeline("--ppo_args", "--max_steps 9 --kl_coef 0.1") == ["ppo"]
    assert "[ppo] running again: its arguments changed since it finished (--kl_coef 0.05 -> 0.1, --max_steps 8 -> 9)" \
        in capsys.readouterr().out
    sft_args = ("--sft_args", "--lora_r 4 --use_peft true")
    assert pipeline("--ppo_args", "--max_steps 9 --kl_coef 0.1", *sft_args) == \
        ["sft", "reward", "ppo"]  # a changed step 1: the later ones were trained on its old output
    # Back to the recipe's value of a flag no longer given: a change too.
    assert pipeline("--ppo_args", "--max_steps 9", *sft_args) == ["ppo"]
    assert "(--kl_coef 0.1 -> 0.05)" in capsys.readouterr().out


def test_a_marker_without_recorded_arguments_matches(pipeline, tmp_path):
    pipeline("--ppo_args", "--max_steps 8")
    for step in ("sft", "reward", "ppo"):  # as train.py wrote them before it recorded the arguments
        marker = tmp_path / "root" / step / "step_complete.json"
        runs.write_json(marker, {k: v for k, v in json.loads(marker.read_text()).items() if k != "settings"})
    assert pipeline("--ppo_args", "--max_steps 80") == []
    summary = json.loads((tmp_path / "root" / "summary.json").read_text())
    assert [row["status"] for row in summary["steps"]] == ["skipped"] * 3 and "settings" not in summary["steps"][0]


def test_relative_paths_in_step_arguments_are_the_users_and_checked_before_step_1(pipeline, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        pipeline("--ppo_args", "--dataset_name my.jsonl")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: step 3 (ppo): --dataset_name my.jsonl: no such file or folder")
    # The steps run from the folder train.py was started from, where such a path was written.
    code, tail = pipeline.real_run_step("x", [sys.executable, "-c", "import os; print(os.getcwd())"], tmp_path / "x.log")
    assert code == 0 and tail == [str(tmp_path)]


def test_a_second_train_py_into_the_same_folder_is_refused(pipeline, tmp_path, held_by_another_process, capsys):
    pid = held_by_another_process(tmp_path / "root")
    with pytest.raises(SystemExit):
        pipeline()
    assert f"is in use by another run (pid {pid})" in capsys.readouterr().err
