"""Step 1 of RLHF: supervised fine-tuning on prompt + chosen answer, with TRL's SFTTrainer.

    accelerate launch --config_file accelerate_config.yaml sft.py --config recipes/opt-1.3b/sft.yaml
    python sft.py --config recipes/demo/sft.yaml --lora_r 16     # any option from the YAML can be overridden

The loss is on the answer only by default (`--completion_only_loss false` trains on the whole sequence).
Perplexity (exp of the eval loss) is reported at every evaluation and at the end.
"""

import math

from transformers import AutoModelForCausalLM
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from simple_rlhf import arguments, data, errors, models, runs, trainer_steps

ARGUMENTS = (data.DataArguments, SFTConfig, ModelConfig)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


def add_perplexity(metrics: dict) -> dict:
    """Perplexity from a mean token cross-entropy, for every *loss key of an eval log."""
    for key in [k for k in metrics if k.endswith("eval_loss")]:
        metrics[key.replace("eval_loss", "eval_perplexity")] = math.exp(min(metrics[key], 50.0))
    return metrics


class PerplexitySFTTrainer(SFTTrainer):
    """SFTTrainer that also logs eval_perplexity wherever it logs eval_loss."""

    def log(self, logs, start_time=None):
        super().log(add_perplexity(logs), start_time)


@errors.exit_on_user_error
def main(data_args: data.DataArguments, training_args: SFTConfig, model_args: ModelConfig):
    tokenizer, resume, train, evaluation = trainer_steps.prepare_trainer_step("sft", data_args, training_args,
                                                                              model_args)
    if training_args.completion_only_loss is None:
        training_args.completion_only_loss = True  # our default: learn the answers, not the prompts

    model = models.load_model(model_args, AutoModelForCausalLM)
    trainer = PerplexitySFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=trainer_steps.trainer_callbacks(),
    )
    runs.log_distribution(trainer.accelerator)
    trainer.train(resume_from_checkpoint=resume)

    metrics = add_perplexity(trainer.evaluate(evaluation))
    trainer_steps.finish(trainer, "sft", metrics, data_args, AutoModelForCausalLM,
                         f"SFT done: eval perplexity {metrics['eval_perplexity']:.3f}")


if __name__ == "__main__":
    main(*arguments.parse_args(ARGUMENTS))
