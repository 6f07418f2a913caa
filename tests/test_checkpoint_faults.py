"""Faults around PPO checkpoints (issue 15, item 9): a damaged checkpoint on resume, a disk that fills while a
checkpoint or the final model is written, a resume with other LoRA flags. Each ends in one `error:` line (or a
warning and a fallback), a non-zero exit where the run cannot go on, no traceback, nothing half-written left."""

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simple_rlhf import checkpoints, health, runs
from simple_rlhf.errors import UserError
from test_ppo import metrics, ppo_main


def errors_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def two_checkpoints(demo_models, tmp_path_factory):  # noqa: F811
    """A run of 2 iterations with checkpoint-1 and checkpoint-2, and its history (the reference for resumes)."""
    out = tmp_path_factory.mktemp("faults") / "base"
    history, _ = ppo_main(demo_models, out, "--save_steps", "1")
    assert runs.newest_complete_checkpoint(out) == str(out / "checkpoint-2")
    return out, history


def copy_run(two_checkpoints, tmp_path) -> Path:
    out = tmp_path / "ppo"
    shutil.copytree(two_checkpoints[0], out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. a damaged checkpoint on resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["trainable_params.pt", "optimizer.pt", "rng_state_0.pth", "trainer_state.json",
                                    "missing scheduler.pt"])
def test_resume_true_skips_a_damaged_newest_checkpoint_and_resumes_exactly_from_the_one_before(
        demo_models, two_checkpoints, tmp_path, capsys, damage):  # noqa: F811
    """Every file is read before anything is modified: a damaged rng_state_0.pth (read last) must not leave
    checkpoint-2's weights or optimizer behind, so the redone step 2 matches the first run's step 2 exactly."""
    out = copy_run(two_checkpoints, tmp_path)
    name = damage.split()[-1]
    if damage.startswith("missing"):
        (out / "checkpoint-2" / name).unlink()
    else:
        truncate(out / "checkpoint-2" / name)
    capsys.readouterr()
    resumed, _ = ppo_main(demo_models, out, "--save_steps", "1", "--resume_from_checkpoint", "true")
    err = capsys.readouterr().err  # the log (its handler writes to stderr)
    warnings = [line for line in err.splitlines() if "--resume_from_checkpoint true: skipped" in line]
    problem = f"its {name} is missing" if damage.startswith("missing") else f"its {name} is damaged (does not load: "
    assert len(warnings) == 1 and f"skipped {out / 'checkpoint-2'}: {problem}" in warnings[0], warnings
    assert warnings[0].endswith(f"; resuming from {out / 'checkpoint-1'}"), warnings
    assert [m["step"] for m in resumed] == [2]
    first_step_2 = two_checkpoints[1][1]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "weights/actor_rms"):
        assert resumed[0][key] == pytest.approx(first_step_2[key], abs=1e-6), key
    assert runs.checkpoint_is_complete(out / "checkpoint-2")  # rewritten, whole
    torch.load(out / "checkpoint-2" / "trainable_params.pt")
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_damaged_checkpoint_given_by_path_is_one_line_naming_the_file_and_changes_nothing(
        demo_models, two_checkpoints, tmp_path, capsys):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path)
    truncate(out / "checkpoint-2" / "optimizer.pt")
    before = files_of(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    errors = errors_of(capsys)
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert errors[0] == (f"error: --resume_from_checkpoint {out / 'checkpoint-2'}: its optimizer.pt is damaged (does "
                         f"not load: OSError: [Errno 22] Invalid argument); resume from {out / 'checkpoint-1'}, the "
                         "checkpoint before it, or with true for the newest complete one that loads"), errors[0]
    assert files_of(out) == before


def test_resume_true_with_no_loadable_checkpoint_left_is_one_line(demo_models, two_checkpoints, tmp_path,
                                                                  capsys):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path)
    truncate(out / "checkpoint-2" / "trainable_params.pt")
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1, "kl_co')
    before = files_of(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--max_steps", "3", "--resume_from_checkpoint", "true")
    errors = errors_of(capsys)
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --resume_from_checkpoint true: no complete checkpoint in {out} loads "
                                f"({out / 'checkpoint-2'}: its trainable_params.pt is damaged (does not load: "), errors[0]
    assert (f"; {out / 'checkpoint-1'}: its trainer_state.json is damaged (does not load: JSONDecodeError: " in errors[0]
            and errors[0].endswith("); start over with --overwrite_output_dir true")), errors[0]
    assert files_of(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. the disk fills while a checkpoint or the final model is written
# ---------------------------------------------------------------------------------------------------------------
def disk_full_at(monkeypatch, file_name: str, step_folder: str):
    """torch.save raises ENOSPC, as a full disk does, when writing `file_name` into `step_folder`'s temporary
    folder, after writing part of the file (the space the partial folder must give back)."""
    save = torch.save

    def full(obj, file, *args, **kwargs):
        name = Path(getattr(file, "name", file))
        if name.name == file_name and name.parent.name == f".partial-{step_folder}":
            file.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)


def test_disk_full_while_writing_a_checkpoint_stops_with_exit_4_and_removes_the_partial_folder(
        demo_models, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "ppo"
    disk_full_at(monkeypatch, "optimizer.pt", "checkpoint-2")
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--max_steps", "3", "--save_steps", "1")
    errors = errors_of(capsys)
    assert exit_info.value.code == health.WriteFailed.exit_code == 4 and len(errors) == 1, errors
    assert errors[0] == (f"error: could not write checkpoint-2 in {out} (No space left on device); free space or "
                         "lower --save_total_limit, then resume with --resume_from_checkpoint true; the last "
                         f"complete checkpoint is {out / 'checkpoint-1'}")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]  # no partial folder
    monkeypatch.undo()
    resumed, _ = ppo_main(demo_models, out, "--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint",
                          "true")
    assert [m["step"] for m in resumed] == [2, 3] and (out / "adapter_model.safetensors").exists()


def test_disk_full_while_writing_the_final_model_stops_with_exit_4_and_leaves_no_half_model(
        demo_models, tmp_path, capsys, monkeypatch):  # noqa: F811
    """safetensors (save_pretrained) reports a full disk as SafetensorError `... (os error 28)`."""
    from peft import PeftModel
    from safetensors import SafetensorError

    out = tmp_path / "ppo"
    save_pretrained = PeftModel.save_pretrained

    def full(self, path, *args, **kwargs):
        if Path(path).name == ".saving":
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_pretrained(self, path, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--save_steps", "2")
    errors = errors_of(capsys)
    assert exit_info.value.code == 4 and len(errors) == 1, errors
    assert errors[0] == (f"error: could not write the final model in {out} (No space left on device); free space "
                         "or lower --save_total_limit, then resume with --resume_from_checkpoint true; the last "
                         f"complete checkpoint is {out / 'checkpoint-2'}")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    monkeypatch.undo()
    resumed, _ = ppo_main(demo_models, out, "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert resumed == [] and (out / "adapter_model.safetensors").exists() and (out / "critic").is_dir()


def fake_accelerator():
    return SimpleNamespace(num_processes=1, is_main_process=True)


def test_write_failures_are_told_from_bugs(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert checkpoints.write_failure(full, tmp_path) == "No space left on device"
    try:  # torch's writer, through a Python file: its RuntimeError carries the OSError as context
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as chained:
        assert checkpoints.write_failure(chained, tmp_path) == "No space left on device"
    assert checkpoints.write_failure(Exception("I/O error: Disk quota exceeded (os error 122)"), tmp_path) == \
        "Disk quota exceeded"
    assert checkpoints.write_failure(PermissionError(errno.EACCES, "Permission denied"), tmp_path) == \
        "Permission denied"
    assert checkpoints.write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0"), tmp_path) \
        .startswith("the write failed: RuntimeError")  # plenty of space here: not called a full disk
    for bug in (ValueError("bad"), KeyError("x"), UserError("--flag: wrong")):
        assert checkpoints.write_failure(bug, tmp_path) is None


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_real_full_device_is_named(tmp_path):
    """/dev/full answers every write with ENOSPC: torch.save through save_tensors keeps that errno."""
    with pytest.raises(Exception) as raised:
        checkpoints.save_tensors({"w": torch.zeros(1000)}, "/dev/full")
    assert checkpoints.write_failure(raised.value, tmp_path) == "No space left on device"


def test_a_bug_while_writing_is_raised_as_it_is_and_the_partial_folder_removed(tmp_path):
    partial = tmp_path / ".partial-checkpoint-3"
    partial.mkdir()
    bug = ValueError("a bug, not the disk")
    with pytest.raises(ValueError, match="a bug, not the disk"):
        checkpoints.stop_if_failed(fake_accelerator(), bug, partial, "checkpoint-3 in out", tmp_path)
    assert not partial.exists()
    partial.mkdir()
    with pytest.raises(health.WriteFailed, match=r"^could not write checkpoint-3 in out \(Permission denied\); "
                       f"check that {tmp_path} can be written, then resume .*; no complete checkpoint was written"):
        checkpoints.stop_if_failed(fake_accelerator(), PermissionError(errno.EACCES, "Permission denied"), partial,
                                   "checkpoint-3 in out", tmp_path)
    assert not partial.exists()
    checkpoints.stop_if_failed(fake_accelerator(), None, partial, "checkpoint-3 in out", tmp_path)  # no failure


# ---------------------------------------------------------------------------------------------------------------
# 3. resume with other LoRA flags
# ---------------------------------------------------------------------------------------------------------------
def test_checkpoints_record_the_lora_settings(two_checkpoints):
    state = json.loads((two_checkpoints[0] / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["lora"] == {"use_peft": True, "lora_r": 4, "lora_alpha": 32, "lora_target_modules": ["q_proj", "v_proj"],
                             "lora_target_parameters": None, "use_rslora": False, "use_dora": False,
                             "lora_modules_to_save": None}


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "8"], "it was written with --lora_r 4, not 8; resume with the same"),
    (["--lora_alpha", "64"], "it was written with --lora_alpha 32, not 64; resume with the same"),
    (["--lora_target_modules", "q_proj", "k_proj", "v_proj"],
     "it was written with --lora_target_modules q_proj v_proj, not k_proj q_proj v_proj; resume with the same"),
    (["--use_peft", "false"], "it was written with --use_peft true, not false; resume with the same"),
])
def test_resume_with_other_lora_flags_is_one_line_naming_the_flag(demo_models, two_checkpoints, tmp_path, capsys,
                                                                  flags, message):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path)
    before = files_of(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--max_steps", "3", "--resume_from_checkpoint", "true", *flags)
    errors = errors_of(capsys)
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert errors[0] == f"error: --resume_from_checkpoint {out / 'checkpoint-2'}: {message}"
    assert files_of(out) == before


def test_resume_of_a_checkpoint_without_the_record_compares_the_tensor_shapes(demo_models, two_checkpoints, tmp_path,
                                                                             capsys):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["lora"]  # as written before the record
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ppo_main(demo_models, out, "--max_steps", "3", "--resume_from_checkpoint", "true", "--lora_r", "8")
    errors = errors_of(capsys)
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert errors[0] == (f"error: --resume_from_checkpoint {out / 'checkpoint-2'}: tensor "
                         "actor.base_model.model.model.decoder.layers.0.self_attn.v_proj.lora_A.default.weight is "
                         "[4, 128] in the checkpoint but [8, 128] in this model: it was written with --lora_r 4, "
                         "not 8; resume with the same"), errors[0]


@pytest.mark.slow
def test_deepspeed_resume_true_skips_a_checkpoint_whose_deepspeed_state_is_truncated(env, demo_models,
                                                                                     tmp_path):  # noqa: F811
    """Under DeepSpeed the optimizer lives in checkpoint-N/deepspeed: its files are opened before any is loaded."""
    from conftest import accelerate_script, run
    from test_ppo import ppo_run

    out = tmp_path / "ds"
    run(accelerate_script(*ppo_run(demo_models, out, "--max_steps", "2", "--save_steps", "1")[1:]), env)
    damaged = sorted((out / "checkpoint-2" / "deepspeed").glob("*/mp_rank_00_model_states.pt"))
    assert len(damaged) == 1
    truncate(damaged[0])
    result = run(accelerate_script(*ppo_run(demo_models, out, "--max_steps", "3", "--save_steps", "1",
                                            "--resume_from_checkpoint", "true")[1:]), env)
    name = damaged[0].relative_to(out / "checkpoint-2")
    assert (f"--resume_from_checkpoint true: skipped {out / 'checkpoint-2'}: its {name} is damaged (does not load: "
            in result.stderr), result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and runs.checkpoint_is_complete(out / "checkpoint-3")


@pytest.mark.slow
def test_two_processes_agree_to_skip_a_checkpoint_damaged_for_one_of_them(env, demo_models, tmp_path):  # noqa: F811
    """Only process 1 reads rng_state_1.pth: both must skip that checkpoint, or they would train from two."""
    import sys

    from conftest import run
    from test_ppo import ppo_run

    out = tmp_path / "ddp"

    def torchrun(*extra):
        return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    *ppo_run(demo_models, out, "--save_steps", "1", *extra)[1:]], env)

    torchrun("--max_steps", "2")
    truncate(out / "checkpoint-2" / "rng_state_1.pth")
    result = torchrun("--max_steps", "3", "--resume_from_checkpoint", "true")
    assert (f"--resume_from_checkpoint true: skipped {out / 'checkpoint-2'}: its rng_state_1.pth is damaged "
            in result.stderr), result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and runs.checkpoint_is_complete(out / "checkpoint-3")
