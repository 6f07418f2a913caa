"""dpo.py end to end on the demo, after a short demo SFT: it learns on held-out pairs, resumes, refuses bad input and
other runs; its data (the reward step's pairs), its memory plan, its chart."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_rlhf import arguments, data, memory, memory_plan, models, plots, runs, synthetic
from conftest import ROOT, SHARED, python_script, run

sys.path.insert(0, str(ROOT / "bench"))
import memory as memory_cli  # noqa: E402  (bench/memory.py)
import memory_validate  # noqa: E402

DEMO_DPO = ["--config", "recipes/demo/dpo.yaml"]
LN2 = math.log(2)


def history(output_dir, key):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="module")
def demo_sft(demo_models):
    """The demo SFT policy (built once per test session, tests/conftest.py): the policy DPO starts from."""
    return demo_models[0]


@pytest.fixture(scope="module")
def demo_dpo(script_env, tmp_path_factory, demo_sft):
    """The demo recipe from that SFT output, shortened, evaluated before the first step and every 20 steps."""
    out = tmp_path_factory.mktemp("dpo")
    result = run(python_script("dpo.py", *DEMO_DPO, "--model_name_or_path", demo_sft, "--output_dir", out,
                               "--max_steps", "40", "--eval_on_start", "true", "--eval_steps", "20",
                               "--save_steps", "20"), script_env)
    return out, result


def test_dpo_lowers_its_loss_and_raises_reward_accuracy_on_held_out_pairs(demo_dpo):
    out, result = demo_dpo
    losses, accuracies = history(out, "eval_loss"), history(out, "eval_rewards/accuracies")
    margins = history(out, "eval_rewards/margins")
    # Before the first step the policy is its reference (dropout off): every log-ratio is 0, the loss ln 2.
    assert losses[0] == pytest.approx(LN2, abs=1e-4) and accuracies[0] == 0 and margins[0] == 0
    assert len(losses) == 4 and losses[-1] < LN2 - 0.1, losses  # start, steps 20 and 40, the final evaluation
    # 128 held-out pairs; a policy that moved at random would rank about half of them right.
    assert accuracies[-1] > 0.6 and margins[-1] > 0.3, (accuracies, margins)
    line = [text for text in result.stdout.splitlines() if text.startswith("DPO done: eval reward accuracy")]
    assert line and f"{accuracies[-1]:.3f}" in line[0] and "margin" in line[0]
    assert "memory estimate:" in result.stderr and "dpo train: 2400 rows" in result.stderr  # the reward step's share


def test_dpo_output_loads_back_with_its_dropout_and_chart(demo_dpo, demo_sft):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = demo_dpo[0]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.dropout == AutoModelForCausalLM.from_pretrained(demo_sft).config.dropout == 0.1
    assert tokenizer.eos_token == "</s>" and not (out / ".saving").exists()
    assert all(runs.checkpoint_is_complete(folder) for folder in out.glob("checkpoint-*"))
    assert json.loads((out / "eval_results.json").read_text())["eval_rewards/accuracies"] > 0.6
    chart = out / "dpo_curves.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plots.guess_step(out) == "dpo"


def test_lora_dpo_resumes_exactly_and_merges(script_env, demo_sft, tmp_path):
    """4 steps uninterrupted == 2 steps, a crash, and a resume; the reference is the policy with its adapter off."""
    args = [*DEMO_DPO, "--model_name_or_path", demo_sft, "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
            "--learning_rate", "1e-3", "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no",
            "--max_eval_samples", "16", "--max_train_samples", "64", "--logging_steps", "1"]
    result = run(python_script("dpo.py", *args, "--output_dir", tmp_path / "whole", "--merge_adapter", "true"),
                 script_env)
    first_loss = float(result.stdout.split("{'loss': '")[1].split("'")[0])
    assert first_loss == pytest.approx(LN2, abs=1e-3)  # a fresh adapter (B = 0): the policy equals its reference
    assert (tmp_path / "whole" / "adapter_config.json").exists()
    assert (tmp_path / "whole" / "merged" / "config.json").exists()

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "checkpoint-2").symlink_to(tmp_path / "whole" / "checkpoint-2")
    (interrupted / "checkpoint-4").mkdir()  # cut off while being written: no checkpoint_complete.json
    (interrupted / "checkpoint-4" / "adapter_config.json").write_text("{")
    result = run(python_script("dpo.py", *args, "--output_dir", interrupted, "--resume_from_checkpoint", "true"),
                 script_env)
    assert f"resuming from {interrupted / 'checkpoint-2'}" in result.stderr
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and whole
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-6), name


def test_qlora_dpo_with_gradient_checkpointing(script_env, demo_sft, tmp_path):
    """4-bit base (bitsandbytes) + LoRA + gradient checkpointing: the reference is the 4-bit base, adapter off."""
    result = run(python_script("dpo.py", *DEMO_DPO, "--model_name_or_path", demo_sft, "--output_dir", tmp_path,
                               "--use_peft", "true", "--load_in_4bit", "true", "--lora_r", "8",
                               "--learning_rate", "1e-3",
                               "--gradient_checkpointing", "true", "--max_steps", "3", "--logging_steps", "1",
                               "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
                               "--max_train_samples", "48", "--max_eval_samples", "16"), script_env)
    losses = [float(part.split("'")[0]) for part in result.stdout.split("{'loss': '")[1:]]
    assert len(losses) == 3 and losses[0] == pytest.approx(LN2, abs=1e-3) and all(math.isfinite(x) for x in losses)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8


def reward_model_folder(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification

    path = models.resolve_model_path(models.BUILTIN_MODEL)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.save_pretrained(folder)
    models.load_tokenizer(path).save_pretrained(folder)
    return folder


def pairs_without_rejected(path: Path) -> Path:
    rows = synthetic.synthetic_preference_rows(40, seed=5)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["no rejected column", "a reward model", "a bad loss_type", "beta 0",
                                  "exo_pair without label smoothing"])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(script_env, tmp_path, capsys, case):
    """In-process: main() exits 2 with one `error:` line, before anything is written."""
    import dpo

    extra, message = {
        "no rejected column": (["--dataset_name", str(pairs_without_rejected(tmp_path / "pairs.jsonl"))],
                               "missing column(s) rejected"),
        "a reward model": (["--model_name_or_path", str(reward_model_folder(tmp_path / "rm"))],
                           "not a causal language model"),
        "a bad loss_type": (["--loss_type", "sigmod"], "--loss_type sigmod: unknown; choose from sigmoid, hinge"),
        "beta 0": (["--beta", "0"], "--beta 0.0: must be > 0"),
        "exo_pair without label smoothing": (["--loss_type", "exo_pair"], "exo_pair needs --label_smoothing > 0"),
    }[case]
    out = tmp_path / "out"
    argv = [*DEMO_DPO, "--model_name_or_path", models.BUILTIN_MODEL, "--output_dir", str(out), *extra]
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(*arguments.parse_args(dpo.ARGUMENTS, argv))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, last_line
    assert not out.exists()


@pytest.mark.slow  # a training run: the slow tier
def test_an_existing_run_is_refused_and_replaced_only_with_overwrite(script_env, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    runs.mark_checkpoint_complete(out / "checkpoint-3", global_step=3)
    (out / "config.json").write_text("{}")
    argv = [*DEMO_DPO, "--model_name_or_path", models.BUILTIN_MODEL, "--output_dir", str(out), "--max_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--max_train_samples", "16", "--max_eval_samples", "8"]
    refused = run(python_script("dpo.py", *argv), script_env, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "already holds a run" in refused.stderr.strip().splitlines()[-1] and (out / "checkpoint-3").is_dir()

    result = run(python_script("dpo.py", *argv, "--overwrite_output_dir", "true"), script_env)
    assert "DPO done" in result.stdout and not (out / "checkpoint-3").exists()
    assert (out / "model.safetensors").exists() and not runs.previous_run_dir(out).exists()


def test_dpo_trains_on_the_reward_steps_pairs_tokenized_whole(script_env):
    """The reward step's share and checks; the prompt cut from the left as for the reward model, answers + EOS."""
    data_args = data.DataArguments(dataset_name=synthetic.BUILTIN_DATASET, max_train_samples=64)
    dpo_rows, dpo_eval = data.load_step_data(data_args, "dpo")
    reward_rows, _ = data.load_step_data(data_args, "reward")
    assert dpo_rows.to_list() == reward_rows.to_list()
    assert set(dpo_rows.column_names) == {"prompt", "chosen", "rejected"}
    tokenizer = models.load_tokenizer(models.resolve_model_path(models.BUILTIN_MODEL))
    rows = dpo_rows.map(lambda row: {"prompt": "\n\nHuman: an earlier turn, long enough to be cut away" * 4 +
                                     row["prompt"]})
    dpo_ids, counts = data.tokenize_for_step(rows, tokenizer, "dpo", max_length=64)
    reward_ids, _ = data.tokenize_for_step(rows, tokenizer, "reward", max_length=64)
    assert counts["truncated"] == len(rows) and len(dpo_ids) == len(reward_ids) > 0
    for pair, scored in zip(dpo_ids, reward_ids):
        assert pair["prompt_ids"] + pair["chosen_ids"] == scored["chosen_ids"]
        assert pair["prompt_ids"] + pair["rejected_ids"] == scored["rejected_ids"]
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(pair["prompt_ids"]).lstrip("</s>").startswith("\n\nHuman:")  # cut at a turn


def dpo_setup(arch, **changes):
    base = dict(step="dpo", models={"model": str(arch)}, launch=memory.Launch(), dtype="float32", use_peft=True,
                lora_r=8, lora_targets=["q_proj", "v_proj"], micro_batch=4, eval_batch=4, max_length=64)
    return memory_plan.Setup(**{**base, **changes})


def test_memory_plan_reference_is_shared_under_lora_and_a_copy_without(script_env):
    arch = models.resolve_model_path(models.BUILTIN_MODEL)
    params = memory.read_arch(arch).params
    reference = lambda plan: [line for line in plan.lines if line.role == "reference"][0]  # noqa: E731
    lora = memory_plan.make_plan(dpo_setup(arch))
    full = memory_plan.make_plan(dpo_setup(arch, use_peft=False))
    precomputed = memory_plan.make_plan(dpo_setup(arch, use_peft=False, precompute_ref=True))
    assert reference(lora).gpu == 0 and reference(lora).note == "shared"
    assert reference(full).gpu == params * 4 and reference(precomputed).gpu == 0
    assert full.total > precomputed.total
    # Chosen and rejected go through in one batch: the activations of 4 pairs are those of 8 SFT sequences (with
    # dropout on, as SFTTrainer leaves it; DPO turns it off by default, which saves its masks).
    sft = memory_plan.make_plan(memory_plan.Setup(step="sft", models={"model": arch}, launch=memory.Launch(),
                                                  dtype="float32", micro_batch=8, max_length=64))
    with_dropout = memory_plan.make_plan(dpo_setup(arch, use_peft=False, dropout_off=False))
    saved = lambda plan: [d[3] for d in plan.details  # noqa: E731
                          if d[2].startswith("activations saved, checkpointed=False")]
    assert saved(with_dropout) == pytest.approx(saved(sft)) and saved(full) < saved(sft)


def test_memory_plan_within_15_percent_of_measured_allocation(script_env, tmp_path):
    """The planner against torch's allocator for DPOTrainer, full fine-tuning (policy, frozen copy, 2x batch)."""
    arch = memory_validate.arch_folder(tmp_path / "small")
    result = memory_validate.measure_trainer_step(memory_validate.Case("dpo", batch=2), arch)
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.15), result


@pytest.mark.skipif(not (SHARED / "model-configs" / "opt-1.3b.json").exists(), reason="../shared is absent")
def test_bench_memory_plans_the_dpo_recipe(capsys, script_env):
    memory_cli.main(["--config", "recipes/opt-1.3b/dpo.yaml"])
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("dpo: DeepSpeed ZeRO-2") and "sized as facebook/opt-1.3b" in out
    assert "weights: the policy's, LoRA off" in out and "fits 24 GiB" in out
