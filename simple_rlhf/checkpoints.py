"""PPO checkpoints: write, prune and load (weights, optimizer, scheduler, RNG), the metrics file, the final save."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from simple_rlhf.errors import UserError, describe
from simple_rlhf import actor_critic, health, models, runs

logger = logging.getLogger("simple_rlhf")


@torch.no_grad()
def save_with_weights(model: nn.Module, weights: dict, path) -> None:
    """Save `model` (an adapter or a full model) with `weights` swapped in for its trainable ones (the EMA)."""
    current = actor_critic.trainable_state(model, cpu=False)
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value.to(params[name].dtype))
    try:
        model.save_pretrained(path)
    finally:
        for name, value in current.items():
            params[name].copy_(value)


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(obj, path) -> None:
    """torch.save through a Python file, so that a failed write (a full disk) raises OSError with its errno, not
    only torch's `unexpected pos` RuntimeError."""
    with open(path, "wb") as file:
        torch.save(obj, file)


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, args, tokenizer, ema=None) -> str:
    """Write output_dir/checkpoint-N via a temporary folder renamed when complete; prune this run's checkpoints to
    save_total_limit. Weights that are not finite are never written as a complete checkpoint. A write that fails
    (a full disk: OSError) removes the temporary folder and stops the run with WriteFailed (exit 4): one line naming
    the folder, the reason and the last complete checkpoint, which is left untouched."""
    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    health.check_weights_finite(accelerator, unwrapped, f"checkpoint-{state['step']}")
    final = output_dir / f"checkpoint-{state['step']}"
    partial = output_dir / f".partial-checkpoint-{state['step']}"
    state = {**state, "lora": lora_settings(unwrapped)}  # compared on resume (load_checkpoint)

    def start():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)

    def write_files():
        save_tensors(rng_state(), partial / f"rng_state_{accelerator.process_index}.pth")
        if not accelerator.is_main_process:
            return
        save_tensors(actor_critic.trainable_state(unwrapped), partial / "trainable_params.pt")
        if accelerator.distributed_type != "DEEPSPEED":
            save_tensors(optimizer.state_dict(), partial / "optimizer.pt")
        save_tensors(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
        with models.dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
            unwrapped.actor.save_pretrained(partial / "actor")
            if unwrapped.critic is not None:
                unwrapped.critic.save_pretrained(partial / "critic")
        tokenizer.save_pretrained(partial / "actor")
        if ema is not None:
            save_tensors({k: v.cpu() for k, v in ema.items()}, partial / "ema.pt")

    def finish():
        """Mark complete, then rename into place; a checkpoint of the same step (a resume from an older one) is
        set aside first and put back if the rename fails."""
        runs.mark_checkpoint_complete(partial, step=state["step"], run_id=state["run_id"], saved_at=time.time())
        aside = output_dir / f".replaced-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        if final.exists():
            os.replace(final, aside)
        try:
            os.replace(partial, final)
        except OSError:
            if aside.exists() and not final.exists():
                os.replace(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    what = f"{final.name} in {output_dir}"
    stop_if_failed(accelerator, attempt(start) if accelerator.is_main_process else None, partial, what, output_dir)
    failure = None
    if accelerator.distributed_type == "DEEPSPEED":
        failure = attempt(lambda: model.save_checkpoint(str(partial / "deepspeed"), exclude_frozen_parameters=True))
    with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped)):
        failure = failure or attempt(write_files)
    stop_if_failed(accelerator, failure, partial, what, output_dir)
    stop_if_failed(accelerator, attempt(finish) if accelerator.is_main_process else None, partial, what, output_dir)
    if accelerator.is_main_process and args.save_total_limit:
        for old in checkpoints_to_prune(output_dir, state["run_id"], args.save_total_limit):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


def attempt(write) -> Exception | None:
    """Run `write()`; return the exception it raised, or None."""
    try:
        write()
    except Exception as error:
        return error
    return None


TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "iostream error")


def write_failure(error: Exception, folder: Path) -> str | None:
    """Why a file could not be written (`No space left on device`) when `error` is such a failure: an OSError
    anywhere in its chain (torch.save through a Python file, json, tokenizers), safetensors' `(os error 28)`, or
    torch's own writer (then judged by the free space). None for anything else: a bug, re-raised as it is."""
    if isinstance(error, UserError):
        return None
    chain, seen = [error], set()
    while chain:
        current = chain.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current.strerror or describe(current)
        found = re.search(r"os error (\d+)", str(current))
        if found:
            return os.strerror(int(found.group(1)))
        chain += [current.__cause__, current.__context__]
    if any(marker in str(error) for marker in TORCH_WRITE_ERRORS):
        return os.strerror(errno.ENOSPC) if free_bytes(folder) < 2**20 else f"the write failed: {describe(error)}"
    return None


def free_bytes(folder: Path) -> float:
    """Free space, in bytes, for this user on the disk of `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return math.inf


def agree(accelerator, reason: str | None) -> str | None:
    """The first process's reason that is not None, on every process (a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return reason
    from accelerate.utils import gather_object

    return next((r for r in gather_object([reason]) if r is not None), None)


def stop_if_failed(accelerator, failure: Exception | None, folder: Path, what: str, output_dir: Path) -> None:
    """On every process: if any process's write failed, remove the half-written `folder` and raise WriteFailed
    (the same line on every process), or this process's own exception if it was not a write failure (a bug)."""
    mine = None if failure is None else write_failure(failure, folder)  # before the removal frees space
    reason = agree(accelerator, None if failure is None else mine or describe(failure))
    if reason is None:
        return
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    if failure is not None and mine is None:
        raise failure
    full = reason in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    newest = runs.newest_complete_checkpoint(output_dir)
    raise health.WriteFailed(
        f"could not write {what} ({reason}); "
        f"{'free space or lower --save_total_limit' if full else f'check that {output_dir} can be written'}, then "
        f"resume with --resume_from_checkpoint true; "
        + (f"the last complete checkpoint is {newest}" if newest else "no complete checkpoint was written yet"))


def new_run_id() -> str:
    """Names a run in its checkpoints, so that pruning never deletes another run's (a resumed run keeps its id)."""
    import uuid

    return uuid.uuid4().hex[:12]


def checkpoints_to_prune(output_dir: Path, run_id: str, keep: int) -> list[Path]:
    """This run's complete checkpoints but the `keep` newest written (by time, not step number: after a resume
    from an older checkpoint, the one just written is the newest even if larger step numbers exist)."""
    mine = []
    for folder in output_dir.glob("checkpoint-*"):
        marker = folder / runs.CHECKPOINT_COMPLETE
        info = json.loads(marker.read_text()) if marker.exists() else {}
        if info.get("run_id") == run_id:
            mine.append((info.get("saved_at", 0.0), folder))
    return [folder for _, folder in sorted(mine)[:-keep]]


LORA_FLAGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules",
              "lora_target_parameters": "target_parameters", "use_rslora": "use_rslora", "use_dora": "use_dora",
              "lora_modules_to_save": "modules_to_save"}  # flag -> the LoraConfig attribute it sets


def lora_settings(unwrapped) -> dict:
    """The actor's adapter settings, under the flags that set them ({"use_peft": False} without LoRA), as PEFT
    resolved them (e.g. the target modules of all-linear): recorded in trainer_state.json and compared on resume."""
    config = getattr(unwrapped.actor, "peft_config", {}).get("default")
    if config is None:
        return {"use_peft": False}
    settings = {"use_peft": True}
    for flag, attribute in LORA_FLAGS.items():
        value = getattr(config, attribute, None)
        settings[flag] = sorted(value) if isinstance(value, (set, frozenset, list, tuple)) else value
    return settings


def as_flag_value(value) -> str:
    """A setting as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)


class Damaged(Exception):
    """A file of a checkpoint marked complete is missing or does not load (truncated, corrupt)."""


def short(error: Exception) -> str:
    """`Type: first sentence of the message`, for a reason in parentheses."""
    first = str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def read_file(folder: Path, name: str, reader):
    try:
        return reader(folder / name)
    except FileNotFoundError:
        raise Damaged(f"its {name} is missing") from None
    except Exception as error:
        raise Damaged(f"its {name} is damaged (does not load: {short(error)})") from None


def read_checkpoint(path: Path, accelerator, want_ema: bool) -> dict:
    """Every file of checkpoint `path` that a resume uses, read into memory before anything is modified, so that a
    damaged one leaves the models, optimizer and RNG as they were (for the fallback to an older checkpoint). Raises
    Damaged naming the first that is missing or does not load. The DeepSpeed folder is opened (memory-mapped) and
    checked here, loaded by DeepSpeed later. An absent ema.pt is no damage (load_checkpoint says what it means)."""
    state = read_file(path, "trainer_state.json", lambda f: json.loads(f.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise Damaged("its trainer_state.json is damaged (no step)")
    files = {"state": state, "params": read_file(path, "trainable_params.pt", torch.load)}
    if not isinstance(files["params"], dict) or not all(torch.is_tensor(v) for v in files["params"].values()):
        raise Damaged("its trainable_params.pt is damaged (not tensors by name)")
    if accelerator.distributed_type == "DEEPSPEED":
        check_deepspeed_folder(path)
    else:
        files["optimizer"] = read_file(path, "optimizer.pt", lambda f: torch.load(f, weights_only=False))
    files["scheduler"] = read_file(path, "scheduler.pt", torch.load)
    if want_ema and (path / "ema.pt").exists():
        files["ema"] = read_file(path, "ema.pt", torch.load)
    rng_name = f"rng_state_{accelerator.process_index}.pth"
    if (path / rng_name).exists():  # absent when resuming with more processes: those start from --seed
        files["rng"] = read_file(path, rng_name, lambda f: torch.load(f, weights_only=False))
    return files


def check_deepspeed_folder(path: Path) -> None:
    """The DeepSpeed engine's part of a checkpoint: `latest` names a tag folder whose state files all open."""
    tag = read_file(path, "deepspeed/latest", lambda f: f.read_text().strip())
    names = sorted(f"deepspeed/{tag}/{f.name}" for f in (path / "deepspeed" / tag).glob("*.pt"))
    if not names:
        raise Damaged(f"its deepspeed/{tag} holds no state files")

    def open_mapped(file):
        try:  # memory-mapped: checks the file (its zip directory is at the end) without reading the tensors
            return torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(file, map_location="cpu", weights_only=False)  # an older, non-zip format

    for name in names:
        read_file(path, name, open_mapped)


def step_of(path: Path) -> int | None:
    number = Path(path).name.split("-")[-1]
    return int(number) if Path(path).name.startswith("checkpoint-") and number.isdigit() else None


def older_complete_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoint-N folders beside `path` with a smaller N, the newest first."""
    step = step_of(path)
    if step is None:
        return []
    found = [p for p in path.parent.glob("checkpoint-*")
             if step_of(p) is not None and step_of(p) < step and runs.checkpoint_is_complete(p)]
    return sorted(found, key=step_of, reverse=True)


def check_compatible(path: Path, files: dict, unwrapped, args, ema) -> None:
    """The checkpoint fits this run: the same estimator, K, LoRA settings and trainable tensors (names, shapes)."""
    state = files["state"]
    for flag, default in (("advantage_estimator", "gae"), ("num_generations", 1)):
        if state.get(flag, default) != getattr(args, flag):
            raise UserError(f"--resume_from_checkpoint {path}: it was written with --{flag} "
                            f"{state.get(flag, default)}, not {getattr(args, flag)}; resume with the same")
    recorded, current = state.get("lora"), lora_settings(unwrapped)
    if recorded is not None:  # checkpoints written before the record fall through to the shapes
        for flag in ["use_peft", *LORA_FLAGS]:
            if recorded.get(flag) != current.get(flag):
                raise UserError(f"--resume_from_checkpoint {path}: it was written with --{flag} "
                                f"{as_flag_value(recorded.get(flag))}, not {as_flag_value(current.get(flag))}; "
                                "resume with the same")
    saved = files["params"]
    mine = {name: param for name, param in unwrapped.named_parameters() if param.requires_grad}
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        lacks = (f"it lacks {len(missing)} trainable tensors of this model (e.g. {missing[0]})" if missing else
                 f"it has {len(extra)} trainable tensors this model lacks (e.g. {extra[0]})")
        raise UserError(f"--resume_from_checkpoint {path}: {lacks}; it was written with other model flags "
                        "(--use_peft, --lora_target_modules, ...); resume with the same")
    for name, param in mine.items():
        theirs, ours = list(saved[name].shape), list(getattr(param, "ds_shape", param.shape))  # ZeRO-3: full shape
        if theirs != ours:
            hint = (f"it was written with --lora_r {theirs[0]}, not {ours[0]}" if ".lora_A." in name and
                    theirs[1:] == ours[1:] else "it was written with other model or LoRA flags")
            raise UserError(f"--resume_from_checkpoint {path}: tensor {name} is {theirs} in the checkpoint but "
                            f"{ours} in this model: {hint}; resume with the same")
    if ema is not None:
        if "ema" not in files:
            raise UserError(f"--resume_from_checkpoint {path}: it has no EMA (ema.pt); it was written without "
                            "--ema_decay")
        bad = sorted(name for name in ema if name not in files["ema"] or files["ema"][name].shape != ema[name].shape)
        if bad:
            raise UserError(f"--resume_from_checkpoint {path}: its ema.pt does not fit this model's actor (e.g. "
                            f"{bad[0]}); it was written with other model flags")


def load_checkpoint(path: str, accelerator, model, optimizer, scheduler, args, ema=None) -> dict:
    """Restore weights, optimizer, scheduler, EMA and RNG from checkpoint `path`; return its trainer state, with
    "resumed_from": the checkpoint used. Every file is read and checked before anything is modified. A damaged
    file (missing, truncated) is one error line naming it, or with `--resume_from_checkpoint true` a warning and
    the next older complete checkpoint (every process takes the same one)."""
    path = Path(path)
    automatic = str(args.resume_from_checkpoint).lower() == "true"
    candidates = [path, *(older_complete_checkpoints(path) if automatic else [])]
    unwrapped = accelerator.unwrap_model(model)
    skipped = []
    for candidate in candidates:
        try:
            files, problem = read_checkpoint(candidate, accelerator, ema is not None), None
        except Damaged as damage:
            files, problem = None, str(damage)
        problem = agree(accelerator, problem)
        if problem is None:
            break
        if not automatic:
            older = older_complete_checkpoints(path)
            raise UserError(f"--resume_from_checkpoint {path}: {problem}; " +
                            (f"resume from {older[0]}, the checkpoint before it, or with true for the newest "
                             "complete one that loads" if older else
                             "no older complete checkpoint is left: start over with --overwrite_output_dir true"))
        skipped.append(f"{candidate}: {problem}")
    else:
        raise UserError(f"--resume_from_checkpoint true: no complete checkpoint in {path.parent} loads "
                        f"({'; '.join(skipped)}); start over with --overwrite_output_dir true")
    if skipped:
        logger.warning(f"--resume_from_checkpoint true: skipped {'; '.join(skipped)}; resuming from {candidate}")
    check_compatible(candidate, files, unwrapped, args, ema)

    if accelerator.distributed_type == "DEEPSPEED":
        model.load_checkpoint(str(candidate / "deepspeed"), load_module_strict=False, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(files["optimizer"])
    saved = files["params"]
    with torch.no_grad(), actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped),
                                                      modifier_rank=0):
        for name, param in unwrapped.named_parameters():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))
    scheduler.load_state_dict(files["scheduler"])
    if ema is not None:
        for name, value in files["ema"].items():
            ema[name].copy_(value)
    if "rng" in files:
        set_rng_state(files["rng"])
    return {**files["state"], "resumed_from": str(candidate)}


def save_final(accelerator, model, args, data_args, model_args, tokenizer, paths, ema=None) -> None:
    """The actor (adapter or full) + tokenizer in output_dir, the critic (if any) in output_dir/critic, the EMA actor
    in output_dir/ema, optionally merged: written to output_dir/.saving, moved in when complete. A write that fails
    (a full disk) removes .saving and stops the run with WriteFailed (exit 4), the checkpoints untouched."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    health.check_weights_finite(accelerator, unwrapped, "the final model")
    staging = output_dir / ".saving"
    main = accelerator.is_main_process
    dropout_changes = getattr(unwrapped, "dropout_changes", [])

    def write_models():
        shutil.rmtree(staging, ignore_errors=True)
        with models.dropout_config_restored(dropout_changes):
            unwrapped.actor.save_pretrained(staging)
            if unwrapped.critic is not None:
                unwrapped.critic.save_pretrained(staging / "critic")
        tokenizer.save_pretrained(staging)

    def write_ema():
        with models.dropout_config_restored(dropout_changes):
            save_with_weights(unwrapped.actor, ema, staging / "ema")
        tokenizer.save_pretrained(staging / "ema")

    def write_merged_and_move_in():
        if data_args.merge_adapter and model_args.use_peft:
            # Reload the SFT policy in full precision on the CPU: merging into a 4-bit base would lose precision.
            full = replace(model_args, load_in_4bit=False, load_in_8bit=False, dtype="float32")
            base = models.load_model(full, AutoModelForCausalLM, paths["sft"], "--sft_model_path")
            PeftModel.from_pretrained(base, str(staging)).merge_and_unload().save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
        elif data_args.merge_adapter:
            logger.warning("--merge_adapter: the actor has no adapter (full fine-tuning); nothing to merge")
        runs.move_into(staging, output_dir)

    failure = None
    with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped)):
        if main:
            failure = attempt(write_models)
    if ema is not None:
        with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped.actor), modifier_rank=0):
            if main and failure is None:
                failure = attempt(write_ema)
    if main and failure is None:
        failure = attempt(write_merged_and_move_in)
    stop_if_failed(accelerator, failure, staging, f"the final model in {output_dir}", output_dir)
    accelerator.wait_for_everyone()


def start_metrics_file(accelerator, args, step: int, resumed: bool) -> Path:
    """OUTPUT_DIR/metrics.jsonl, without the lines of steps after the checkpoint we resume from (to be redone)."""
    metrics_file = Path(args.output_dir) / "metrics.jsonl"
    if accelerator.is_main_process:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_file.read_text().splitlines() if metrics_file.exists() and resumed else [])
                if json.loads(line)["step"] <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    if args.report_to != "none":
        accelerator.init_trackers("ppo", config={k: v for k, v in asdict(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    return metrics_file
