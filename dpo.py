"""The one-step alternative to steps 2 and 3: Direct Preference Optimization of the SFT policy, with TRL's DPOTrainer.

    python dpo.py --config recipes/demo/dpo.yaml --model_name_or_path out/demo/sft
    accelerate launch --config_file accelerate_config.yaml dpo.py --config recipes/opt-1.3b/dpo.yaml

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains the policy on chosen/rejected pairs directly, with no reward
model and no sampling: the loss -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)) pushes the
policy's log-probability ratio to a frozen reference (the starting SFT policy) up on the chosen answer and down on
the rejected one. With LoRA the reference is the policy with its adapter off (no second copy of the weights); in
full fine-tuning it is a frozen copy (or none, with --precompute_ref_log_probs true).

The data are the reward step's: its share of --data_split, the same validation and pairs, tokenized as reward.py
does (the prompt cut from the left at turn boundaries, each answer + EOS kept whole). TRL's DPOConfig options
(--beta, --loss_type, --label_smoothing, ...) are parsed as they are. The eval rows report TRL's implicit-reward
metrics: accuracy (chosen's log-ratio above rejected's) and margin (their mean difference, times beta).
"""

from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config

from simple_rlhf import arguments, data, errors, models, runs, trainer_steps
from simple_rlhf.errors import UserError

ARGUMENTS = (data.DataArguments, DPOConfig, ModelConfig)


# TRL 1.16's DPOTrainer: its loss types, and the ones its f-divergence generalisation (--f_divergence_type) covers.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


def check_dpo_args(args: DPOConfig, model_args: ModelConfig) -> None:
    """The DPO options TRL would reject only once the trainer is built (or at the first step): one line now, before
    anything is loaded, written or set aside."""
    unknown = [name for name in args.loss_type if name not in LOSS_TYPES]
    if unknown:
        raise UserError(f"--loss_type {unknown[0]}: unknown; choose from {', '.join(LOSS_TYPES)}")
    if args.beta <= 0:
        raise UserError(f"--beta {args.beta}: must be > 0 (it scales the log-ratios; 0.1 is usual)")
    if args.f_divergence_type not in F_DIVERGENCES:
        raise UserError(f"--f_divergence_type {args.f_divergence_type}: unknown; choose from "
                        f"{', '.join(F_DIVERGENCES)}")
    if args.f_divergence_type != "reverse_kl" and not set(args.loss_type) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise UserError(f"--f_divergence_type {args.f_divergence_type} works only with --loss_type "
                        f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; use reverse_kl with {', '.join(args.loss_type)}")
    if not 0 <= args.label_smoothing < (0.5 if "robust" in args.loss_type else 1):
        raise UserError(f"--label_smoothing {args.label_smoothing}: must be in [0, "
                        f"{'0.5' if 'robust' in args.loss_type else '1'})")
    if "exo_pair" in args.loss_type and args.label_smoothing == 0:
        raise UserError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 1e-3)")
    if args.ld_alpha is not None and not 0 <= args.ld_alpha <= 1:
        raise UserError(f"--ld_alpha {args.ld_alpha}: must be in [0, 1]")
    if args.use_weighting and {"aot", "aot_unpaired"} & set(args.loss_type):
        raise UserError("--use_weighting true does not work with --loss_type aot or aot_unpaired")
    if args.sync_ref_model and (model_args.use_peft or args.precompute_ref_log_probs):
        raise UserError("--sync_ref_model true needs full fine-tuning (no --use_peft) and no "
                        "--precompute_ref_log_probs: it updates a reference model that LoRA and precomputing do not "
                        "keep")
    if args.max_length is None:
        raise UserError("--max_length: give the longest prompt + answer in tokens, e.g. 512")


class PreTokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on rows that data.tokenize_for_step(..., "dpo") already tokenized and fitted into max_length
    (prompt_ids, chosen_ids, rejected_ids). TRL 1.16 would tokenize them again from text columns they no longer have."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


@errors.exit_on_user_error
def main(data_args: data.DataArguments, training_args: DPOConfig, model_args: ModelConfig):
    check_dpo_args(training_args, model_args)
    tokenizer, resume, train, evaluation = trainer_steps.prepare_trainer_step("dpo", data_args, training_args,
                                                                              model_args)

    model = models.load_model(model_args, AutoModelForCausalLM)
    # The reference: with LoRA, the policy with its adapter off (TRL does it when ref_model is None); with full
    # fine-tuning, a frozen copy loaded the same way (an SFT adapter folder merged), unless the reference log-probs
    # are precomputed from the policy before its first step.
    ref_model = None
    if not model_args.use_peft and not training_args.precompute_ref_log_probs:
        ref_model = models.load_model(model_args, AutoModelForCausalLM)
    changed = []
    if training_args.disable_dropout:
        # TRL's switch misses the functional dropout of OPT and others: policy and reference must agree exactly.
        changed = models.disable_dropout(model)
        if ref_model is not None:
            models.disable_dropout(ref_model)
    trainer = PreTokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=trainer_steps.trainer_callbacks(),
    )
    runs.log_distribution(trainer.accelerator)
    trainer.train(resume_from_checkpoint=resume)

    metrics = trainer.evaluate()
    with models.dropout_config_restored(changed):  # the saved config keeps the model's own dropout
        trainer_steps.finish(trainer, "dpo", metrics, data_args, AutoModelForCausalLM,
                             f"DPO done: eval reward accuracy {metrics['eval_rewards/accuracies']:.3f}, margin "
                             f"{metrics['eval_rewards/margins']:.3f}")


if __name__ == "__main__":
    main(*arguments.parse_args(ARGUMENTS))
