"""The ground truth of builtin:synthetic: the answer checker, the held-out seed, and evaluate.py's columns."""

import json
from collections import Counter

import pytest

from simple_rlhf import data, models, synthetic

SPIDER = "\n\nHuman: Hi there!\n\nAssistant: Hello!\n\nHuman: How many legs does a spider have?\n\nAssistant:"
CAPITAL = "\n\nHuman: What is the capital of Japan?\n\nAssistant:"
SUM = "\n\nHuman: What is 3 plus 4?\n\nAssistant:"


@pytest.mark.parametrize("prompt, answer, correct, polite", [
    (SPIDER, " 8. I hope that helps!", True, True),
    (SPIDER, " It is 15. Glad I could help!", False, True),  # the demo's PPO sample of issue 9
    (SPIDER, " 8, you idiot.", True, False),
    (SPIDER, " Ugh. 6. Leave me alone.", False, False),
    (SPIDER, " 8 or 6. Happy to help.", False, True),  # two candidates: not an answer
    (SPIDER, " 8.", True, False),  # no courtesy: not polite
    (SPIDER, " 18. I hope that helps!", False, True),  # 8 inside 18 is not 8
    (CAPITAL, " The answer is Tokyo. Happy to help.", True, True),
    (CAPITAL, " The answer is tokyo. Obviously. Happy to help.", True, False),
    (CAPITAL, " The answer is Paris. Happy to help.", False, True),
    (CAPITAL, " Happy to help.", False, True),  # no answer at all
    (SUM, " 7. Let me know if you have more questions.", True, True),
    (SUM, " The answer is 34. Happy to help.", False, True),
])
def test_checker_on_hand_made_answers(prompt, answer, correct, polite):
    assert synthetic.check_synthetic_answer(prompt, answer) == {"correct": correct, "polite": polite,
                                                             "both": correct and polite}


def test_checker_knows_every_question_the_generator_asks_and_nothing_else():
    assert synthetic.synthetic_answer_key("What is 3 plus 4?") == ("7", None)
    assert synthetic.synthetic_answer_key("What color is grass?")[0] == "green"
    with pytest.raises(ValueError, match="not a builtin:synthetic question"):
        synthetic.synthetic_answer_key("What color is the moon?")
    for row in synthetic.synthetic_preference_rows(300, seed=7):  # every prompt has a key; chosen answers are right
        assert synthetic.check_synthetic_answer(row["prompt"], row["chosen"])["both"]


def test_templates_carry_their_manners():
    for template in synthetic._POLITE:
        assert synthetic._has_phrase(template, synthetic._POLITE_PHRASES)
        assert not synthetic._has_phrase(template, synthetic._RUDE_PHRASES)
    for template in synthetic._RUDE:
        assert synthetic._has_phrase(template, synthetic._RUDE_PHRASES)


def test_rejected_answers_are_mostly_wrong_but_polite():
    import evaluate

    rows = synthetic.synthetic_preference_rows(3000, seed=7)
    flaws = Counter(evaluate.flaw_of(row) for row in rows)
    for flaw, weight in synthetic.SYNTHETIC_FLAWS.items():
        assert abs(flaws[flaw] / len(rows) - weight) < 0.03, flaws
    # A wrong-only rejected answer differs from the chosen one in the answer alone (same template).
    row = next(r for r in rows if evaluate.flaw_of(r) == "wrong")
    assert row["chosen"].split()[-2:] == row["rejected"].split()[-2:]


def test_held_out_seed_is_one_no_training_step_reads(script_env):
    seeds = synthetic.SYNTHETIC_SEEDS
    assert len(set(seeds.values())) == len(seeds)
    raw = data.load_raw_dataset(data.DataArguments(dataset_name=synthetic.BUILTIN_DATASET))
    assert raw["train"]["prompt"] == [r["prompt"] for r in synthetic.synthetic_preference_rows(6000, seeds["train"])]
    assert raw["test"]["prompt"] == [r["prompt"] for r in synthetic.synthetic_preference_rows(200, seeds["test"])]
    held_out = synthetic.synthetic_held_out_rows(50)
    assert held_out == synthetic.synthetic_preference_rows(50, seeds["held_out"])
    assert [r["prompt"] for r in held_out] != raw["train"]["prompt"][:50]
    assert [r["prompt"] for r in held_out] != raw["test"]["prompt"][:50]


def test_ground_truth_rates_count_the_checks():
    import evaluate

    rates = evaluate.ground_truth_rates([SPIDER] * 4, [" 8. I hope that helps!", " 8, you idiot.",
                                                       " 6. Happy to help.", " 6, you idiot."])
    assert rates == {"correct_rate": 0.5, "polite_rate": 0.5, "both_rate": 0.25}


def test_evaluate_prints_ground_truth_and_accuracy_by_flaw(script_env, tmp_path, capsys):
    import evaluate
    from transformers import AutoModelForSequenceClassification

    tiny = models.resolve_model_path(models.BUILTIN_MODEL)
    reward = tmp_path / "reward"  # an untrained one-label classifier on the tiny model: numbers, not quality
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).save_pretrained(reward)
    models.load_tokenizer(tiny).save_pretrained(reward)
    args = evaluate.EvalArguments(reward_model_path=str(reward), policies=[f"sft={tiny}", f"base={tiny}"],
                                  max_prompts=8, response_length=6, held_out_pairs=30, output_dir=str(tmp_path))
    evaluate.main(args, data.DataArguments(dataset_name=synthetic.BUILTIN_DATASET, max_eval_samples=16))
    out = capsys.readouterr().out
    assert "correct_rate" in out and "polite_rate" in out and "both_rate" in out
    assert "held-out pairs, accuracy by the rejected answer's flaw: wrong" in out
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert set(results["reward"]["accuracy_by_flaw"]) == {"wrong", "rude", "both"}
    for policy in results["policies"].values():
        assert all(0 <= policy[k] <= 1 for k in ("correct_rate", "polite_rate", "both_rate"))
        assert policy["both_rate"] <= min(policy["correct_rate"], policy["polite_rate"])
