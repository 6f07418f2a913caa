"""PPO checkpoints: write, prune and load (weights, optimizer, scheduler, RNG), the metrics file, the final save."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from simple_rlhf.errors import UserError
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


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, args, tokenizer, ema=None) -> str:
    """Write output_dir/checkpoint-N via a temporary folder renamed when complete; prune this run's checkpoints to
    save_total_limit. Weights that are not finite are never written as a complete checkpoint."""
    output_dir = Path(args.output_dir)
    health.check_weights_finite(accelerator, accelerator.unwrap_model(model), f"checkpoint-{state['step']}")
    final = output_dir / f"checkpoint-{state['step']}"
    partial = output_dir / f".partial-checkpoint-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "DEEPSPEED":
        model.save_checkpoint(str(partial / "deepspeed"), exclude_frozen_parameters=True)
    torch.save(rng_state(), partial / f"rng_state_{accelerator.process_index}.pth")
    with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped)):
        if accelerator.is_main_process:
            torch.save(actor_critic.trainable_state(unwrapped), partial / "trainable_params.pt")
            if accelerator.distributed_type != "DEEPSPEED":
                torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
            with models.dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                unwrapped.actor.save_pretrained(partial / "actor")
                if unwrapped.critic is not None:
                    unwrapped.critic.save_pretrained(partial / "critic")
            tokenizer.save_pretrained(partial / "actor")
            if ema is not None:
                torch.save({k: v.cpu() for k, v in ema.items()}, partial / "ema.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        runs.mark_checkpoint_complete(partial, step=state["step"], run_id=state["run_id"], saved_at=time.time())
        os.replace(partial, final)
        if args.save_total_limit:
            for old in checkpoints_to_prune(output_dir, state["run_id"], args.save_total_limit):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return str(final)


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


def load_checkpoint(path: str, accelerator, model, optimizer, scheduler, args, ema=None) -> dict:
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    for flag, default in (("advantage_estimator", "gae"), ("num_generations", 1)):
        if state.get(flag, default) != getattr(args, flag):
            raise UserError(f"--resume_from_checkpoint {path}: it was written with --{flag} "
                                   f"{state.get(flag, default)}, not {getattr(args, flag)}; resume with the same")
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "DEEPSPEED":
        model.load_checkpoint(str(path / "deepspeed"), load_module_strict=False, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    saved = torch.load(path / "trainable_params.pt")
    missing = set(actor_critic.trainable_state(unwrapped)) - set(saved)
    if missing:
        raise UserError(f"--resume_from_checkpoint {path}: it lacks {len(missing)} trainable tensors (e.g. "
                               f"{sorted(missing)[0]}); it was written with other model flags")
    with torch.no_grad(), actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped), modifier_rank=0):
        for name, param in unwrapped.named_parameters():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    if ema is not None:
        if not (path / "ema.pt").exists():
            raise UserError(f"--resume_from_checkpoint {path}: it has no EMA (ema.pt); it was written without "
                                   "--ema_decay")
        for name, value in torch.load(path / "ema.pt").items():
            ema[name].copy_(value)
    rng_file = path / f"rng_state_{accelerator.process_index}.pth"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_final(accelerator, model, args, data_args, model_args, tokenizer, paths, ema=None) -> None:
    """The actor (adapter or full) + tokenizer in output_dir, the critic (if any) in output_dir/critic, the EMA actor
    in output_dir/ema, optionally merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unwrapped = accelerator.unwrap_model(model)
    health.check_weights_finite(accelerator, unwrapped, "the final model")
    staging = Path(args.output_dir) / ".saving"
    with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped)):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            with models.dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                unwrapped.actor.save_pretrained(staging)
                if unwrapped.critic is not None:
                    unwrapped.critic.save_pretrained(staging / "critic")
            tokenizer.save_pretrained(staging)
    if ema is not None:
        with actor_critic.zero3_gathered(accelerator, actor_critic.trainable_parameters(unwrapped.actor), modifier_rank=0):
            if accelerator.is_main_process:
                with models.dropout_config_restored(getattr(unwrapped, "dropout_changes", [])):
                    save_with_weights(unwrapped.actor, ema, staging / "ema")
                tokenizer.save_pretrained(staging / "ema")
    if accelerator.is_main_process:
        if data_args.merge_adapter and model_args.use_peft:
            # Reload the SFT policy in full precision on the CPU: merging into a 4-bit base would lose precision.
            full = replace(model_args, load_in_4bit=False, load_in_8bit=False, dtype="float32")
            base = models.load_model(full, AutoModelForCausalLM, paths["sft"], "--sft_model_path")
            PeftModel.from_pretrained(base, str(staging)).merge_and_unload().save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
        elif data_args.merge_adapter:
            logger.warning("--merge_adapter: the actor has no adapter (full fine-tuning); nothing to merge")
        runs.move_into(staging, args.output_dir)
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
