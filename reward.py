"""Step 2 of RLHF: a reward model trained on chosen/rejected pairs, with TRL's RewardTrainer.

    accelerate launch --config_file accelerate_config.yaml reward.py --config recipes/opt-1.3b/reward.yaml
    python reward.py --config recipes/demo/reward.yaml --model_name_or_path out/demo/sft   # start from SFT output

The model is AutoModelForSequenceClassification with one label: it scores the last real token of prompt + answer.
With LoRA the task type is SEQ_CLS, so the new score head is trained and saved with the adapter.
Accuracy (chosen scored above rejected) and mean margin are reported on the eval rows.
"""

from transformers import AutoModelForSequenceClassification
from trl import ModelConfig, RewardConfig, RewardTrainer, get_peft_config

from simple_rlhf import arguments, data, errors, models, runs, trainer_steps

ARGUMENTS = (data.DataArguments, RewardConfig, ModelConfig)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


@errors.exit_on_user_error
def main(data_args: data.DataArguments, training_args: RewardConfig, model_args: ModelConfig):
    tokenizer, resume, train, evaluation = trainer_steps.prepare_trainer_step("reward", data_args, training_args,
                                                                       model_args)

    model = models.load_model(model_args, AutoModelForSequenceClassification, num_labels=1)
    # The score is read at the last token that is not padding, so the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.use_peft and model_args.lora_task_type == "CAUSAL_LM":
        model_args.lora_task_type = "SEQ_CLS"  # trains and saves the new score head with the adapter
    trainer = RewardTrainer(
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

    metrics = trainer.evaluate(evaluation)
    trainer_steps.finish(trainer, "reward", metrics, data_args, AutoModelForSequenceClassification,
                         f"Reward model done: eval accuracy {metrics['eval_accuracy']:.3f}, mean margin "
                         f"{metrics['eval_margin']:.3f}")


if __name__ == "__main__":
    main(*arguments.parse_args(ARGUMENTS))
