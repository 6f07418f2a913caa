"""Evaluate the steps' outputs on held-out data: any mix of SFT perplexity, reward accuracy, and policies' answers.

    python evaluate.py --dataset_name builtin:synthetic --sft_model_path out/demo/sft \
        --reward_model_path out/demo/reward \
        --policies base=builtin:tiny-opt sft=out/demo/sft ppo=out/demo/ppo --show 3 --output_dir out/demo/eval

- `--sft_model_path`: perplexity of the chosen answers (answer tokens only, as sft.py trains) on the eval split;
- `--reward_model_path`: accuracy (chosen scored above rejected) and mean margin on the eval pairs;
- `--policies name=path ...`: each policy answers the held-out prompts (sampled, the same seed for all); reported:
  the reward model's mean score, the win rate against the reference policy (`--reference`, default sft: the
  fraction of prompts where the reward model scores this policy's answer higher, ties counting half), the KL to the
  reference (per answer, estimated from the log-probs of the sampled tokens as ppo.py does; not with --top_k or
  --top_p, whose truncated samples would give the KL of neither the policy nor the sampler), mean length and EOS rate;
- `--dataset_name builtin:synthetic`: ground truth, checked by code from the generator's tables: the policies answer
  held-out questions (a seed no training step reads) and each policy's share of answers that are correct, polite,
  and both is reported; the reward model's accuracy is also given per flaw of the rejected answer (rude, wrong,
  both) on held-out pairs;
- `--best_of_n N`: one more policy row, `<reference>-best-of-N`: the reference policy's best of N sampled answers
  per prompt as the reward model ranks them (Stiennon et al. 2020; Gao et al. 2022), what the reward model gives with
  no RL at all; its KL to the reference is the analytic bound log N - (N - 1) / N, not an estimate;
- builtin:synthetic with a reward model: per policy, the reward model's agreement with the ground truth on that
  policy's own answers: `rm_auc` (the AUC of the score for correct-and-polite answers against the others) and
  `rm_auc_correct` (correct against not); it falls when a policy finds answers the reward model overrates;
- `--show N` prints N prompts with every policy's answer and score side by side (DeepSpeed-Chat's prompt_eval).

The eval rows are the dataset's test split, or the rows the steps held out (same --eval_fraction and seed).
A table on screen; OUTPUT_DIR/eval_results.json with every number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simple_rlhf import arguments, data, errors, models, rollout, runs, synthetic


@dataclass
class EvalArguments:
    sft_model_path: str | None = field(default=None, metadata={
        "help": "An SFT output (model or adapter folder): report its perplexity on the eval answers."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "A reward model (reward.py's output): report accuracy and margin on the eval pairs, and score the "
                "policies' answers."})
    policies: list[str] = field(default_factory=list, metadata={
        "help": "Policies to compare, as name=path (model folder, adapter folder, hub id or builtin:tiny-opt), e.g. "
                "base=builtin:tiny-opt sft=out/demo/sft ppo=out/demo/ppo."})
    reference: str = field(default="sft", metadata={
        "help": "The policy name that win rates and KL are measured against (ppo.py's reference is the SFT policy)."})
    output_dir: str = field(default="out/eval", metadata={"help": "Where eval_results.json is written."})
    max_length: int = field(default=512, metadata={"help": "Longest prompt + answer for perplexity and accuracy."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts are cut from the left to this length."})
    max_prompts: int = field(default=64, metadata={"help": "How many held-out prompts the policies answer."})
    response_length: int = field(default=64, metadata={"help": "Most new tokens per answer."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature (1.0: the policy itself, which the KL estimate assumes)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass or generate() call."})
    show: int = field(default=0, metadata={"help": "Print this many prompts with each policy's answer."})
    seed: int = field(default=42, metadata={"help": "Seed of the sampling (the same for every policy)."})
    held_out_pairs: int = field(default=300, metadata={
        "help": "builtin:synthetic: held-out pairs for the reward model's accuracy per flaw of the rejected answer."})
    best_of_n: int = field(default=0, metadata={
        "help": "Add the policy <reference>-best-of-N: per prompt, N answers sampled from the reference policy (same "
                "temperature and length) and the one the reward model scores highest (needs --reward_model_path). "
                "0: off."})


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str, flag: str, auto_class, **kwargs):
    """A model (adapter folders merged into their base) in eval mode, and its tokenizer padded on the left."""
    from trl import ModelConfig

    resolved = models.resolve_model_path(path, flag)
    model = models.load_model(ModelConfig(model_name_or_path=resolved), auto_class, resolved, flag, **kwargs)
    return model.to(device()).eval(), models.load_tokenizer(resolved, padding_side="left")


def parse_policies(entries: list[str]) -> dict[str, str]:
    policies = {}
    for entry in entries:
        name, _, path = entry.partition("=")
        if not name or not path:
            raise errors.UserError(f"--policies {entry}: write each policy as name=path, e.g. sft=out/demo/sft")
        if name in policies:
            raise errors.UserError(f"--policies: the name {name!r} is given twice; give each policy its own name")
        policies[name] = path
    return policies


# ----------------------------------------------------------------------------------------------------------------
# SFT perplexity and reward accuracy
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sft_perplexity(args: EvalArguments, data_args: data.DataArguments) -> dict:
    """exp(mean cross-entropy over the chosen answers' tokens), the quantity sft.py reports as eval_perplexity."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load(args.sft_model_path, "--sft_model_path", AutoModelForCausalLM)
    _, rows = data.load_step_data(data_args, "sft")
    encoded, _ = data.tokenize_for_step(rows, tokenizer, "sft", args.max_length)
    total, count = 0.0, 0
    for part in rollout.chunks(len(encoded), args.batch_size):
        batch = encoded[part]
        ids, mask = rollout.left_pad(batch["input_ids"], tokenizer.pad_token_id, device())
        answer, _ = rollout.left_pad(batch["completion_mask"], 0, device())
        logits = rollout.policy_logits(model, ids, mask)[:, :-1]
        logprobs = rollout.logprobs_from_logits(logits, ids[:, 1:], 1.0)
        total -= (logprobs * answer[:, 1:]).sum().item()
        count += answer[:, 1:].sum().item()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "rows": len(encoded)}


@torch.no_grad()
def sequence_scores(reward_model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """The reward model's score of each sequence (left padding), read where ppo.py reads rollouts' scores."""
    scores = []
    for part in rollout.chunks(len(sequences), batch_size):
        ids, mask = rollout.left_pad(sequences[part], pad_token_id, device())
        scores.append(rollout.score_at_last_token(reward_model, ids, mask).cpu())
    return torch.cat(scores)


def reward_accuracy(reward_model, reward_tokenizer, args: EvalArguments, data_args: data.DataArguments) -> dict:
    _, rows = data.load_step_data(data_args, "reward")
    encoded, _ = data.tokenize_for_step(rows, reward_tokenizer, "reward", args.max_length)
    pad = reward_tokenizer.pad_token_id
    chosen = sequence_scores(reward_model, encoded["chosen_ids"], pad, args.batch_size)
    rejected = sequence_scores(reward_model, encoded["rejected_ids"], pad, args.batch_size)
    return {"eval_accuracy": (chosen > rejected).float().mean().item(),
            "eval_margin": (chosen - rejected).mean().item(), "pairs": len(encoded)}


def reward_accuracy_by_flaw(reward_model, reward_tokenizer, args: EvalArguments) -> dict:
    """builtin:synthetic: accuracy on held-out pairs, split by what is wrong with the rejected answer (found by the
    ground-truth check): a reward model that only detects rudeness is perfect on `rude` and at chance on `wrong`."""
    import datasets

    rows = synthetic.synthetic_held_out_rows(args.held_out_pairs)
    encoded, _ = data.tokenize_for_step(datasets.Dataset.from_list(rows), reward_tokenizer, "reward",
                                          args.max_length)
    pad = reward_tokenizer.pad_token_id
    right = (sequence_scores(reward_model, encoded["chosen_ids"], pad, args.batch_size) >
             sequence_scores(reward_model, encoded["rejected_ids"], pad, args.batch_size))
    flaws = [flaw_of(row) for row in rows]
    return {flaw: right[[f == flaw for f in flaws]].float().mean().item()
            for flaw in synthetic.SYNTHETIC_FLAWS if flaw in flaws}


def flaw_of(row: dict) -> str:
    check = synthetic.check_synthetic_answer(row["prompt"], row["rejected"])
    return "both" if not (check["correct"] or check["polite"]) else "wrong" if check["polite"] else "rude"


def ground_truth_checks(prompts: list[str], answers: list[str]) -> list[dict[str, bool]]:
    """builtin:synthetic: each answer checked (simple_rlhf.synthetic.check_synthetic_answer: correct, polite, both)."""
    return [synthetic.check_synthetic_answer(p, a) for p, a in zip(prompts, answers)]


def ground_truth_rates(prompts: list[str], answers: list[str]) -> dict:
    """builtin:synthetic: the shares of answers that are correct, polite, and both (simple_rlhf.synthetic.check_synthetic_answer)."""
    return rates_of(ground_truth_checks(prompts, answers))


def rates_of(checks: list[dict[str, bool]]) -> dict:
    return {f"{key}_rate": sum(c[key] for c in checks) / len(checks) for key in ("correct", "polite", "both")}


def auc(scores, labels) -> float | None:
    """The area under the ROC curve of `scores` for telling the answers labelled True from those labelled False: the
    probability that a random True answer scores above a random False one, ties counting half (the Mann-Whitney U
    statistic over n_true * n_false). None when either class is empty."""
    scores = [float(s) for s in scores]
    labels = [bool(label) for label in labels]
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    # Ranks 1..n of the scores, tied scores sharing their average rank: then sum(ranks of True) - n_true (n_true + 1)
    # / 2 counts the (True, False) pairs with the True one higher, ties counted half.
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    above = sum(r for r, label in zip(ranks, labels) if label) - positives * (positives + 1) / 2
    return above / (positives * negatives)


def reward_model_agreement(scores: torch.Tensor, checks: list[dict]) -> dict:
    """builtin:synthetic: how well the reward model's scores of a policy's own answers rank them as the ground truth
    does: rm_auc for correct and polite answers against the others, rm_auc_correct for correct against wrong."""
    return {"rm_auc": auc(scores.tolist(), [c["both"] for c in checks]),
            "rm_auc_correct": auc(scores.tolist(), [c["correct"] for c in checks])}


def best_of_n_selection(scores: torch.Tensor) -> torch.Tensor:
    """Best-of-N: `scores` is (prompts, N), the reward model's score of each prompt's N answers; returns, per prompt,
    the index in the flattened (prompts * N) batch (prompt-major: row p * N + j is prompt p's answer j) of its
    highest-scored answer, the first of equal best ones."""
    prompts, n = scores.shape
    return scores.argmax(dim=1) + torch.arange(prompts, device=scores.device) * n


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-N || policy) <= log N - (N - 1) / N per prompt (Stiennon et al. 2020; Gao et al. 2022; exact when
    the N answers are distinct and their scores untied, an upper bound otherwise: Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def policy_prompts(args: EvalArguments, data_args: data.DataArguments) -> list[str]:
    """The prompts the policies answer: held-out rows (for builtin:synthetic, questions no step trained on)."""
    if data_args.dataset_name == synthetic.BUILTIN_DATASET:
        return [row["prompt"] for row in synthetic.synthetic_held_out_rows(args.max_prompts)]
    _, rows = data.load_step_data(data_args, "ppo")
    return rows["prompt"][: args.max_prompts]


# ----------------------------------------------------------------------------------------------------------------
# Policies: answers, scores, KL
# ----------------------------------------------------------------------------------------------------------------
def answer(model, tokenizer, prompts: list[str], args: EvalArguments, seed: int | None = None,
           logprobs: bool = True) -> dict:
    """Sampled answers to the prompts (cut from the left as ppo.py cuts them) and their summed log-probs (when
    `logprobs`). seed: of the sampling (default --seed, the same for every policy)."""
    import datasets

    encoded, _ = data.tokenize_for_step(datasets.Dataset.from_dict({"prompt": prompts}), tokenizer, "ppo",
                                          args.max_prompt_length, args.max_prompt_length)
    queries, query_mask = rollout.left_pad(encoded["input_ids"], tokenizer.pad_token_id, device())
    config = rollout.sampling_config(args.response_length, args.temperature, args.top_k, args.top_p,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(args.seed if seed is None else seed)  # every policy samples with the same seed
    sample = rollout.generate_rollout(model, queries, query_mask, config, args.batch_size)
    return {"rollout": sample, "tokenizer": tokenizer,
            "logprobs": sequence_logprobs(model, sample, args) if logprobs else None}


def sequence_logprobs(model, sample: rollout.Rollout, args: EvalArguments) -> torch.Tensor:
    """Sum of log-probs of each answer's tokens under `model` (at the sampling temperature)."""
    out = []
    for part in rollout.chunks(len(sample), args.batch_size):
        logprobs = rollout.response_logprobs(model, sample[part], args.temperature)
        out.append((logprobs * sample.response_mask[part]).sum(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def score_answers(reward_fn, sample: rollout.Rollout, batch_size: int) -> torch.Tensor:
    """The reward model's scores of prompt + answer (through text when the tokenizers differ, as in ppo.py)."""
    return torch.cat([reward_fn(sample[part]).cpu() for part in rollout.chunks(len(sample), batch_size)])


def decode_answers(answers: dict) -> list[str]:
    """The answers as text; control characters (an untrained model emits any byte) shown as '?' to keep the
    terminal sane."""
    tokenizer, sample = answers["tokenizer"], answers["rollout"]
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
             for r, m in zip(sample.responses, sample.response_mask)]
    return ["".join(c if c.isprintable() or c == "\n" else "?" for c in text) for text in texts]


def evaluate_policies(policies: dict[str, str], reward, args: EvalArguments, data_args) -> tuple[dict, dict]:
    """Each policy's numbers, and the answers (for --show). Models are loaded one at a time, plus the reference."""
    from transformers import AutoModelForCausalLM

    prompts = policy_prompts(args, data_args)
    reference = None
    if args.reference in policies:
        reference = load(policies[args.reference], f"--policies {args.reference}", AutoModelForCausalLM)
    results, rollouts = {}, {}
    for name, path in policies.items():
        model, tokenizer = reference if name == args.reference else load(path, f"--policies {name}",
                                                                         AutoModelForCausalLM)
        answers = answer(model, tokenizer, prompts, args)
        sample = answers["rollout"]
        numbers = {"path": path}
        if reference is not None and rollout.same_tokenizer(tokenizer, reference[1]) and not truncated(args):
            # k1 estimate of KL(policy || reference) per answer: E[log p(answer) - log q(answer)] over samples.
            numbers["kl_to_reference"] = (answers["logprobs"] - sequence_logprobs(reference[0], sample,
                                                                                  args)).mean().item()
        if reward is not None:
            # The scoring function is decided per policy: its tokenizer may differ from the reward model's.
            reward_fn = rollout.reward_function(reward[0], tokenizer, reward[1])
            answers["scores"] = score_answers(reward_fn, sample, args.batch_size)
        numbers.update(answer_numbers(prompts, answers, data_args))
        results[name], rollouts[name] = numbers, answers
        del model
    if args.best_of_n:
        name = best_of_n_name(args)
        numbers, rollouts[name] = best_of_n(reference, reward, prompts, args, data_args)
        results[name] = {"path": policies[args.reference], **numbers}
    if reward is not None and args.reference in rollouts:
        ref_scores = rollouts[args.reference]["scores"]
        for name in results:
            scores = rollouts[name]["scores"]
            results[name][f"win_rate_vs_{args.reference}"] = ((scores > ref_scores).float().mean()
                                                              + 0.5 * (scores == ref_scores).float().mean()).item()
    return results, {"prompts": prompts, **rollouts}


def answer_numbers(prompts: list[str], answers: dict, data_args) -> dict:
    """A policy's numbers from its answers (and their scores, when there is a reward model): mean length, EOS rate,
    reward mean and std; for builtin:synthetic the ground-truth rates and the reward model's agreement with them."""
    sample, scores = answers["rollout"], answers.get("scores")
    numbers = {"mean_length": sample.response_mask.sum(1).float().mean().item(),
               "eos_rate": sample.has_stop.float().mean().item()}
    if scores is not None:
        numbers["reward_mean"] = scores.mean().item()
        numbers["reward_std"] = scores.std().item() if len(scores) > 1 else 0.0
    if data_args.dataset_name == synthetic.BUILTIN_DATASET:
        checks = ground_truth_checks(prompts, decode_answers(answers))
        numbers.update(rates_of(checks))
        if scores is not None:
            numbers.update(reward_model_agreement(scores, checks))
    return numbers


def best_of_n_name(args: EvalArguments) -> str:
    return f"{args.reference}-best-of-{args.best_of_n}"


def best_of_n(reference, reward, prompts: list[str], args: EvalArguments, data_args) -> tuple[dict, dict]:
    """The reference policy's best of --best_of_n answers per prompt by the reward model: N answers per prompt
    sampled as the other policies' (temperature, length; seed --seed + 1, so they are drawn apart from the reference
    row's own answers), all scored as the other rows are (rollout.reward_function), the highest kept."""
    model, tokenizer = reference
    n = args.best_of_n
    repeated = [prompt for prompt in prompts for _ in range(n)]  # prompt-major: row p * N + j is prompt p's answer j
    answers = answer(model, tokenizer, repeated, args, seed=args.seed + 1, logprobs=False)
    scores = score_answers(rollout.reward_function(reward[0], tokenizer, reward[1]), answers["rollout"],
                           args.batch_size)
    best = best_of_n_selection(scores.view(len(prompts), n))
    answers.update(rollout=answers["rollout"][best], scores=scores[best])
    numbers = {"best_of": args.reference, "best_of_n": n}
    if not truncated(args):
        # A selection has no per-token log-probs to estimate KL from; the analytic bound stands in, named as such.
        numbers["kl_to_reference_bound"] = best_of_n_kl_bound(n)
    numbers.update(answer_numbers(prompts, answers, data_args))
    return numbers, answers


def truncated(args: EvalArguments) -> bool:
    """Whether the answers are sampled from a truncated distribution (--top_k, --top_p): then the log-probs of the
    full one, and a KL estimated from them, are those of neither the sampler nor the policy; no KL is reported."""
    return args.top_k != 0 or args.top_p < 1.0


def show_answers(answers: dict, count: int) -> None:
    names = [name for name in answers if name != "prompts"]
    texts = {name: decode_answers(answers[name]) for name in names}
    for i, prompt in enumerate(answers["prompts"][:count]):
        print(f"\n========== prompt {i + 1} ==========\n{prompt.strip()[-500:]}")
        for name in names:
            score = answers[name].get("scores")
            note = f" (score {score[i].item():.3f})" if score is not None else ""
            print(f"---------- {name}{note}\n{texts[name][i]}")


def print_table(results: dict) -> None:
    print()
    if "sft" in results:
        print(f"SFT perplexity on {results['sft']['rows']} eval answers: {results['sft']['eval_perplexity']:.3f}")
    if "reward" in results:
        r = results["reward"]
        print(f"Reward model on {r['pairs']} eval pairs: accuracy {r['eval_accuracy']:.3f}, "
              f"mean margin {r['eval_margin']:.3f}")
        if "accuracy_by_flaw" in r:
            print(f"Reward model on {r['held_out_pairs']} held-out pairs, accuracy by the rejected answer's flaw: " +
                  ", ".join(f"{flaw} {value:.3f}" for flaw, value in r["accuracy_by_flaw"].items()))
    policies = results.get("policies", {})
    if policies:
        present = {k for p in policies.values() for k in p}
        columns = ["reward_mean"] + sorted(k for k in present if k.startswith("win_rate")) + \
                  ["kl_to_reference", "mean_length", "eos_rate"] + \
                  [c for c in ("correct_rate", "polite_rate", "both_rate", "rm_auc", "rm_auc_correct") if c in present]
        runs.print_table([["policy"] + columns] + [[name] + [table_cell(p, c) for c in columns]
                                                     for name, p in policies.items()])
        for name, p in policies.items():
            if "kl_to_reference_bound" in p:
                print(f"{name}: KL <= log N - (N-1)/N with N = {p['best_of_n']}, the analytic bound for a best-of-N "
                      "selection (not estimated from samples)")


def table_cell(policy: dict, column: str) -> str:
    """A number of the policies' table: '-' where there is none; a best-of-N row's KL is its bound, written <=."""
    if column == "kl_to_reference" and "kl_to_reference_bound" in policy:
        return f"<={policy['kl_to_reference_bound']:.3f}"
    value = policy.get(column)
    return "-" if value is None else f"{value:.3f}"


ARGUMENTS = (EvalArguments, data.DataArguments)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


@errors.exit_on_user_error
def main(args: EvalArguments, data_args: data.DataArguments) -> dict:
    from transformers import AutoModelForSequenceClassification

    runs.setup_logging()
    policies = parse_policies(args.policies)
    if not (args.sft_model_path or args.reward_model_path or policies):
        raise errors.UserError("nothing to evaluate: give --sft_model_path, --reward_model_path and/or --policies")
    for flag in ("max_prompts", "response_length", "batch_size", "max_length", "max_prompt_length",
                 "held_out_pairs"):
        if getattr(args, flag) < 1:
            raise errors.UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.best_of_n < 0:
        raise errors.UserError(f"--best_of_n {args.best_of_n}: must be at least 0 (0: off)")
    if args.best_of_n and not args.reward_model_path:
        raise errors.UserError(f"--best_of_n {args.best_of_n}: best-of-N ranks the answers by the reward model; give "
                               "--reward_model_path")
    if args.best_of_n and args.reference not in policies:
        raise errors.UserError(f"--best_of_n {args.best_of_n}: samples the reference policy --reference "
                               f"{args.reference}, which is not among --policies; add {args.reference}=PATH")
    if args.best_of_n and best_of_n_name(args) in policies:
        raise errors.UserError(f"--policies: the name {best_of_n_name(args)!r} is the best-of-N row's; rename it")
    for flag, path in [("--sft_model_path", args.sft_model_path), ("--reward_model_path", args.reward_model_path),
                       *[(f"--policies {n}", p) for n, p in policies.items()]]:
        if path:
            resolved = models.resolve_model_path(path, flag)  # a missing folder fails here, before any model is loaded
            if flag != "--reward_model_path":
                models.require_causal_lm(resolved, flag)  # a reward model given as a policy would run silently
    if args.reward_model_path:
        models.check_reward_model(models.resolve_model_path(args.reward_model_path, "--reward_model_path"),
                               "--reward_model_path")
    if policies and truncated(args):
        runs.logger.warning(f"--top_k {args.top_k} --top_p {args.top_p}: the answers are sampled from the truncated "
                            "distribution, so scores and win rates are those of truncated sampling and no KL to the "
                            "reference is reported; leave --top_k 0 --top_p 1.0 for the policies' own KL")

    results = {"dataset": data_args.dataset_name}
    if args.sft_model_path:
        results["sft"] = {"path": args.sft_model_path, **sft_perplexity(args, data_args)}
    reward = None
    if args.reward_model_path:
        reward = load(args.reward_model_path, "--reward_model_path", AutoModelForSequenceClassification, num_labels=1)
        results["reward"] = {"path": args.reward_model_path,
                             **reward_accuracy(reward[0], reward[1], args, data_args)}
        if data_args.dataset_name == synthetic.BUILTIN_DATASET:
            results["reward"].update(held_out_pairs=args.held_out_pairs,
                                     accuracy_by_flaw=reward_accuracy_by_flaw(reward[0], reward[1], args))
    if policies:
        results["policies"], answers = evaluate_policies(policies, reward, args, data_args)
        results["policy_settings"] = {"prompts": len(answers["prompts"]), "reference": args.reference,
                                      "response_length": args.response_length, "temperature": args.temperature,
                                      "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                                      "best_of_n": args.best_of_n}
        if args.show:
            show_answers(answers, args.show)
    print_table(results)
    path = Path(args.output_dir) / "eval_results.json"
    runs.write_json(path, results)
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main(*arguments.parse_args(ARGUMENTS))
