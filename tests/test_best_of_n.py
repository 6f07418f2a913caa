"""evaluate.py's best-of-N baseline and the reward model's agreement with the ground truth (rm_auc): the pure
functions on hand-made numbers, the one-line refusals, and one run on the demo models."""

import json
import math
import random

import pytest
import torch

from simple_rlhf import data, synthetic

import evaluate


def pairwise_auc(scores, labels):
    """The definition, pair by pair: P(a True answer's score > a False one's), ties half."""
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("scores, labels, expected", [
    ([1.0, 2.0, 3.0, 4.0], [False, False, True, True], 1.0),  # every good answer above every bad one
    ([4.0, 3.0, 2.0, 1.0], [False, False, True, True], 0.0),  # every good answer below
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 0.35 loses to 0.4 only: 3 of 4 pairs
    ([1.0, 2.0, 2.0, 3.0], [0, 1, 0, 1], 0.875),  # a tie counts half: (1 + 0.5 + 1 + 1) / 4
    ([5.0, 5.0, 5.0], [1, 0, 0], 0.5),  # a constant score knows nothing
])
def test_auc_on_hand_made_numbers(scores, labels, expected):
    assert evaluate.auc(scores, labels) == pytest.approx(expected)


def test_auc_is_none_when_a_class_is_empty_and_matches_the_pairwise_definition():
    assert evaluate.auc([1.0, 2.0], [True, True]) is None and evaluate.auc([1.0], [False]) is None
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(15)]  # few values: many ties
        labels = [rng.random() < 0.4 for _ in scores]
        if 0 < sum(labels) < len(labels):
            assert evaluate.auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))


def test_reward_model_agreement_on_both_and_on_correct():
    # Answers to one question: (correct, polite) and the reward model's score.
    checks = [{"correct": c, "polite": p, "both": c and p} for c, p in
              [(True, True), (True, False), (False, True), (False, False)]]
    agreement = evaluate.reward_model_agreement(torch.tensor([3.0, 1.0, 2.0, 0.0]), checks)
    assert agreement["rm_auc"] == 1.0  # the one good answer scores highest
    assert agreement["rm_auc_correct"] == pytest.approx(0.75)  # the correct-but-rude one loses to the wrong-but-polite
    assert evaluate.reward_model_agreement(torch.tensor([1.0, 2.0]), checks[:1] * 2) == \
           {"rm_auc": None, "rm_auc_correct": None}


def test_best_of_n_picks_each_prompts_highest_scored_answer():
    scores = torch.tensor([[0.1, 0.9, 0.3],
                           [2.0, -1.0, 2.0],  # a tie: the first of the best
                           [-5.0, -4.0, -3.0]])
    assert evaluate.best_of_n_selection(scores).tolist() == [1, 3, 8]  # rows of the flat (prompts * N) batch
    flat = scores.flatten()
    assert flat[evaluate.best_of_n_selection(scores)].tolist() == scores.max(dim=1).values.tolist()


def test_best_of_n_kl_bound():
    assert evaluate.best_of_n_kl_bound(1) == 0.0
    assert evaluate.best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluate.best_of_n_kl_bound(16) == pytest.approx(1.8351, abs=1e-4)


def test_table_shows_the_bound_and_missing_aucs(capsys):
    policies = {"sft": {"reward_mean": 1.0, "kl_to_reference": 0.0, "mean_length": 9.0, "eos_rate": 0.5,
                        "both_rate": 0.2, "rm_auc": 0.7, "rm_auc_correct": 0.6},
                "sft-best-of-4": {"reward_mean": 2.0, "kl_to_reference_bound": evaluate.best_of_n_kl_bound(4),
                                  "best_of_n": 4, "mean_length": 9.0, "eos_rate": 0.9, "both_rate": 0.0,
                                  "rm_auc": None, "rm_auc_correct": None}}
    evaluate.print_table({"policies": policies})
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.startswith("policy"))
    assert header[-2:] == ["rm_auc", "rm_auc_correct"]
    row = next(line.split() for line in lines if line.startswith("sft-best-of-4"))
    assert row[header.index("kl_to_reference")] == "<=0.636" and row[-2:] == ["-", "-"]
    assert any("sft-best-of-4: KL <= log N - (N-1)/N with N = 4" in line for line in lines)


@pytest.mark.parametrize("options, message", [
    (dict(best_of_n=4, policies=["sft=builtin:tiny-opt"]),
     "error: --best_of_n 4: best-of-N ranks the answers by the reward model; give --reward_model_path"),
    (dict(best_of_n=4, reward_model_path="R", policies=["ppo=builtin:tiny-opt"]),
     "error: --best_of_n 4: samples the reference policy --reference sft, which is not among --policies; "
     "add sft=PATH"),
    (dict(best_of_n=-1, policies=["sft=builtin:tiny-opt"]), "error: --best_of_n -1: must be at least 0 (0: off)"),
])
def test_best_of_n_refusals_are_one_line(options, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any model or data is loaded
        evaluate.main(evaluate.EvalArguments(output_dir=str(tmp_path), **options), data.DataArguments())
    assert exit_info.value.code == 2 and capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "eval_results.json").exists()


@pytest.fixture(scope="module")
def quick_demo_models(demo_models):
    """Steps 1 and 2 of the demo (built once per test session, tests/conftest.py)."""
    return demo_models


@pytest.mark.slow  # ~55 s on a shared 2-core CPU, most of it the fixture's training
def test_best_of_4_on_the_demo_models_beats_sft_by_the_reward_model(quick_demo_models, tmp_path, capsys):
    sft, reward = quick_demo_models
    args = evaluate.EvalArguments(reward_model_path=reward, policies=[f"sft={sft}"], best_of_n=4, max_prompts=32,
                                  response_length=10, held_out_pairs=20, output_dir=str(tmp_path))
    evaluate.main(args, data.DataArguments(dataset_name=synthetic.BUILTIN_DATASET, max_eval_samples=16))
    out = capsys.readouterr().out
    assert "sft-best-of-4" in out and "rm_auc" in out
    results = json.loads((tmp_path / "eval_results.json").read_text())
    policies = results["policies"]
    assert list(policies) == ["sft", "sft-best-of-4"] and results["policy_settings"]["best_of_n"] == 4
    best, sft_row = policies["sft-best-of-4"], policies["sft"]
    assert best["best_of"] == "sft" and best["path"] == sft
    # The best of 4 independent samples by the reward model, against the SFT row's one sample per prompt.
    assert best["reward_mean"] >= sft_row["reward_mean"] and best["win_rate_vs_sft"] >= 0.5
    assert best["kl_to_reference_bound"] == pytest.approx(math.log(4) - 0.75) and "kl_to_reference" not in best
    for policy in (sft_row, best):
        for key, rate in (("rm_auc", "both_rate"), ("rm_auc_correct", "correct_rate")):
            # An AUC in [0, 1] exactly where the policy's answers hold both classes (good and bad), else none.
            assert key in policy and (policy[key] is None) == (policy[rate] in (0.0, 1.0))
            assert policy[key] is None or 0 <= policy[key] <= 1
        assert 0 < policy["mean_length"] <= 10 and 0 <= policy["eos_rate"] <= 1
