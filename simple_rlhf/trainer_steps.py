"""What sft.py and reward.py share around TRL's trainers: preparation, checkpoint markers, the final save."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from simple_rlhf import data, memory_plan, models, plots, runs

logger = logging.getLogger("simple_rlhf")


def prepare_trainer_step(step: str, data_args: data.DataArguments, training_args, model_args):
    """What sft.py and reward.py do before they build their trainer: logging, flag checks, the tokenizer, the
    checkpoint to resume from, and the step's tokenized (train, eval) rows.

    The rows are tokenized here, not by TRL's trainers: SFTTrainer would cut long rows from the right and lose the
    answer, RewardTrainer would silently drop every pair longer than max_length.
    """
    runs.setup_logging(training_args.process_index == 0)
    models.check_model_flags(model_args)
    runs.lock_output_dir(training_args.output_dir, training_args.process_index == 0)  # then no other run starts there
    runs.check_output_dir(training_args.output_dir, data_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    path = models.resolve_model_path(model_args.model_name_or_path)
    if step in ("sft", "dpo"):
        models.require_causal_lm(path, "--model_name_or_path")
    models.check_lora_targets(model_args, path, "--model_name_or_path", sequence_classifier=step == "reward")
    # One line: the predicted peak GPU memory, a warning when it exceeds the visible GPU.
    memory_plan.log_estimate(step, training_args, model_args)
    tokenizer = models.load_tokenizer(path)
    resume = runs.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    with training_args.main_process_first(desc="tokenizing"):
        train, evaluation = data.prepare_step_data(data_args, tokenizer, step, training_args.max_length)
    # Last, once the data is known to be good: a mistake above leaves the old run where it was.
    if data_args.overwrite_output_dir:
        with training_args.main_process_first(desc="setting the previous run aside"):
            if training_args.process_index == 0:
                runs.set_previous_run_aside(training_args.output_dir)
    return tokenizer, resume, train, evaluation


def trainer_callbacks():
    """Callbacks for transformers' Trainer: mark each checkpoint complete once it is saved."""
    from transformers import TrainerCallback

    class MarkCheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    runs.mark_checkpoint_complete(folder, global_step=state.global_step)

    return [MarkCheckpointComplete()]


def save_trainer_output(trainer, output_dir: str, merge_adapter: bool, merged_class) -> None:
    """Save the trained model (adapter or full) and tokenizer into output_dir without a half-written state.

    Everything is written to output_dir/.saving first and moved in once complete. With --merge_adapter, the adapter
    is reloaded in full precision on the CPU and merged into its base, written to output_dir/merged.
    """
    from peft import PeftModel

    staging = Path(output_dir) / ".saving"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.accelerator.is_main_process:
        if merge_adapter and (staging / "adapter_config.json").exists():
            base = models.adapter_base(str(staging))
            model = models.load_merged(merged_class, base, {"num_labels": 1} if "Sequence" in merged_class.__name__ else {})
            merged = PeftModel.from_pretrained(model, str(staging)).merge_and_unload()
            merged.save_pretrained(staging / "merged")
            trainer.processing_class.save_pretrained(staging / "merged")
        elif merge_adapter:
            logger.warning("--merge_adapter: the model has no adapter (full fine-tuning); nothing to merge")
        # Trainer keeps the full log history only in checkpoints: save the final one with the model, for the charts.
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        runs.move_into(staging, output_dir)
        runs.drop_previous_run(output_dir)  # the final model is complete: an overwritten run may go now
    trainer.accelerator.wait_for_everyone()


def finish(trainer, step: str, metrics: dict, data_args, merged_class, message: str) -> None:
    """The end of sft.py / reward.py / dpo.py: the final eval metrics logged and saved, the model saved (save_trainer
    output), the step's one line printed, its chart drawn from the trainer_state.json saved with the model."""
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    save_trainer_output(trainer, trainer.args.output_dir, data_args.merge_adapter, merged_class)
    trainer.accelerator.print(f"{message}, model in {trainer.args.output_dir}")
    if trainer.is_world_process_zero():
        plots.plot_step(step, trainer.args.output_dir)
    trainer.accelerator.end_training()
