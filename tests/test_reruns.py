"""Re-runs never destroy finished work: a fresh run refuses a folder that holds another run unless told to overwrite
or resume; an overwrite deletes the old run only once the new one has finished; train.py --force builds the new step
beside the old one and swaps it in at the end."""

import json

import pytest

from simple_rlhf import arguments, runs
from simple_rlhf.errors import UserError
from conftest import python_script, run

QUICK_SFT = ["--config", "recipes/demo/sft.yaml", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy",
             "no", "--max_train_samples", "64", "--max_eval_samples", "16", "--logging_steps", "1"]


def finished_run(folder, checkpoints=(2,)):
    """A folder as a finished run leaves it: checkpoints and a final model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("old weights")
    for step in checkpoints:
        runs.mark_checkpoint_complete(folder / f"checkpoint-{step}", global_step=step)
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the rule, in-process --------------------------------------------------------------------------------------------
def test_fresh_run_into_another_runs_folder_is_refused(tmp_path):
    finished_run(tmp_path / "run")
    with pytest.raises(UserError) as error:
        runs.check_output_dir(tmp_path / "run", overwrite=False, resume=None)
    assert str(error.value) == (f"--output_dir {tmp_path / 'run'} already holds a run (checkpoint-2, config.json); "
                                "pass --resume_from_checkpoint true to continue it, --overwrite_output_dir true to "
                                "replace it (the old run is deleted once the new one has finished), or choose "
                                "another --output_dir")


@pytest.mark.parametrize("overwrite, resume", [(True, None), (False, "true"), (False, True)])
def test_overwrite_or_resume_is_allowed(tmp_path, overwrite, resume):
    finished_run(tmp_path / "run")
    runs.check_output_dir(tmp_path / "run", overwrite=overwrite, resume=resume)


def test_empty_missing_or_unrelated_folders_are_fine(tmp_path):
    runs.check_output_dir(tmp_path / "missing", overwrite=False, resume=None)
    runs.check_output_dir(tmp_path, overwrite=False, resume=None)
    (tmp_path / "notes.txt").write_text("mine")
    runs.check_output_dir(tmp_path, overwrite=False, resume=None)


def test_resume_true_without_a_checkpoint_does_not_restart_over_a_finished_model(tmp_path):
    finished_run(tmp_path / "run", checkpoints=())
    with pytest.raises(UserError, match="holds no complete checkpoint to resume, but a finished model"):
        runs.check_output_dir(tmp_path / "run", overwrite=False, resume="true")


def test_overwrite_and_resume_together_is_refused(tmp_path):
    with pytest.raises(UserError, match="--overwrite_output_dir true and --resume_from_checkpoint: choose one"):
        runs.check_output_dir(tmp_path, overwrite=True, resume="true")


def test_overwrite_refuses_a_folder_that_contains_the_current_one(tmp_path, monkeypatch):
    finished_run(tmp_path / "run")
    (tmp_path / "run" / "work").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "work")
    with pytest.raises(UserError, match="contains the current folder"):
        runs.check_output_dir(tmp_path / "run", overwrite=True, resume=None)


def test_previous_run_is_set_aside_and_dropped_only_after_success(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    old = snapshot(run_dir)
    aside = runs.set_previous_run_aside(run_dir)
    assert aside == tmp_path / "run.previous-run" and snapshot(aside) == old
    assert run_dir.is_dir() and not any(run_dir.iterdir())
    (run_dir / "checkpoint-1").mkdir()  # the new run, interrupted
    # Overwriting again: the last finished run stays aside, the interrupted attempt is discarded.
    runs.set_previous_run_aside(run_dir)
    assert snapshot(aside) == old and not any(run_dir.iterdir())
    runs.drop_previous_run(run_dir)
    assert not aside.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_folder_without_a_run_is_not_moved(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert runs.set_previous_run_aside(tmp_path) is None and (tmp_path / "notes.txt").exists()


# ---- sft.py end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_refuses_an_old_runs_folder_then_overwrites_it_on_request(script_env, tmp_path):
    out = finished_run(tmp_path / "sft", checkpoints=(40,))
    old = snapshot(out)
    result = run(python_script("sft.py", *QUICK_SFT, "--output_dir", out), script_env, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(errors) == 1 and "already holds a run" in errors[0], result.stderr[-2000:]
    assert snapshot(out) == old

    run(python_script("sft.py", *QUICK_SFT, "--output_dir", out, "--overwrite_output_dir", "true"), script_env)
    assert not (out / "checkpoint-40").exists() and (out / "model.safetensors").read_bytes() != b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"], "the old run is gone once the new one finished"


# ---- train.py --force ------------------------------------------------------------------------------------------------
def finished_pipeline(root):
    for name in ("sft", "reward"):
        finished_run(root / name)
        runs.write_json(root / name / "step_complete.json", {"step": name, "duration_s": 1.0, "metrics": {},
                                                               "output": str(root / name)})
    runs.write_json(root / "summary.json", {"steps": []})
    return {name: snapshot(root / name) for name in ("sft", "reward")}, (root / "summary.json").read_text()


def train(root, *extra):
    return python_script("train.py", "--preset", "demo", "--output_dir", root, "--accelerate_config", "none", *extra)


@pytest.mark.parametrize("sft_args, expected", [
    ("--lora_rr 4", "error: step 1 (sft): unknown option --lora_rr; did you mean --lora_r?"),  # refused before anything runs
    pytest.param("--max_length 2", "step 1 (sft) failed with exit code 2",  # fails inside the step, in sft.new
                 marks=pytest.mark.slow),
])
def test_force_with_a_mistake_leaves_the_finished_steps_intact(script_env, tmp_path, sft_args, expected):
    before, summary = finished_pipeline(tmp_path)
    result = run(train(tmp_path, "--steps", "1", "--force", "--sft_args", sft_args), script_env, check=False)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert {name: snapshot(tmp_path / name) for name in ("sft", "reward")} == before
    assert (tmp_path / "summary.json").read_text() == summary
    assert not (tmp_path / "sft.new").exists(), "a failed attempt without a checkpoint leaves nothing behind"


@pytest.mark.slow
def test_force_swaps_the_new_step_in_once_it_finished(script_env, tmp_path):
    finished_pipeline(tmp_path)
    result = run(train(tmp_path, "--steps", "1", "--force", "--sft_args", " ".join(QUICK_SFT[2:])), script_env)
    assert (tmp_path / "sft" / "model.safetensors").read_bytes() != b"old weights"
    assert json.loads((tmp_path / "sft" / "step_complete.json").read_text())["output"] == str(tmp_path / "sft")
    assert not (tmp_path / "sft.new").exists() and not (tmp_path / "sft.old").exists()
    assert "reward was trained on the previous sft output" in result.stdout


def test_an_interrupted_swap_is_completed(tmp_path):
    """A crash between the two renames of a swap: the next run finds the old folder aside and the new one ready."""
    target, new = tmp_path / "sft", tmp_path / "sft.new"
    finished_run(tmp_path / "sft.old")
    finished_run(new)
    (new / "step_complete.json").write_text("{}")
    runs.finish_interrupted_swap(target, ready=lambda folder: (folder / "step_complete.json").exists())
    assert (target / "step_complete.json").exists() and not new.exists() and not (tmp_path / "sft.old").exists()


def test_an_interrupted_swap_without_a_ready_replacement_is_undone(tmp_path):
    target = tmp_path / "sft"
    old = snapshot(finished_run(tmp_path / "sft.old"))
    runs.finish_interrupted_swap(target, ready=lambda folder: (folder / "step_complete.json").exists())
    assert snapshot(target) == old and not (tmp_path / "sft.old").exists()


# ---- train.py: fp32 steps on a CPU without native bf16 -----------------------------------------------------------------
@pytest.mark.parametrize("cuda, fast_bf16, step_args, config, fp32", [
    (False, False, [], "accelerate_config.yaml", True),  # this AVX2 machine: bf16 would be emulated, ~10x slower
    (False, False, ["--bf16", "true"], "accelerate_config.yaml", False),  # asked for
    (False, True, [], "accelerate_config.yaml", False),  # native bf16
    (True, False, [], "accelerate_config.yaml", False),  # a GPU
    (False, False, [], "none", False),  # plain python: the recipe decides
])
def test_steps_launch_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, tmp_path, cuda, fast_bf16, step_args,
                                                            config, fp32):
    import torch

    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(arguments, "cpu_has_fast_bf16", lambda: fast_bf16)
    args = train.TrainArguments(preset="demo", accelerate_config=config)
    command = train.step_command(args, "sft", tmp_path, {"sft": step_args, "reward": [], "ppo": []}, resume=False)
    launch = command[:command.index(str(train.ROOT / "sft.py"))]
    assert (launch[-2:] == ["--mixed_precision", "no"]) is fp32, launch
