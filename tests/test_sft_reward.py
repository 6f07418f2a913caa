"""sft.py and reward.py end to end, as users launch them: plain python and accelerate + DeepSpeed, on CPU."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_rlhf import arguments, data, models, runs, synthetic
from conftest import accelerate_script, python_script, run

DEMO_SFT = ["--config", "recipes/demo/sft.yaml"]
DEMO_REWARD = ["--config", "recipes/demo/reward.yaml"]
QUICK = ["--max_steps", "6", "--eval_strategy", "no", "--save_strategy", "no", "--max_eval_samples", "32",
         "--logging_steps", "2"]


def eval_history(output_dir, key):
    state = json.loads((Path(runs.newest_complete_checkpoint(output_dir)) / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="session")
def sft_full(script_env, tmp_path_factory):
    """Full fine-tuning of the demo model, plain python: the SFT output the reward model starts from."""
    out = tmp_path_factory.mktemp("sft_full")
    result = run(python_script("sft.py", *DEMO_SFT, "--output_dir", out, "--max_train_samples", "640",
                               "--num_train_epochs", "3", "--eval_on_start", "true", "--eval_steps", "40",
                               "--save_steps", "40", "--max_eval_samples", "64"), script_env)
    return out, result


@pytest.fixture(scope="session")
def reward_from_sft(script_env, tmp_path_factory, sft_full):
    """Reward model on the SFT output (chaining steps 1 -> 2), plain python, full fine-tuning."""
    out = tmp_path_factory.mktemp("reward_full")
    result = run(python_script("reward.py", *DEMO_REWARD, "--model_name_or_path", sft_full[0], "--output_dir", out,
                               "--max_train_samples", "1200", "--num_train_epochs", "1", "--eval_on_start", "true",
                               "--eval_steps", "25", "--save_steps", "25", "--max_eval_samples", "128"), script_env)
    return out, result


def test_sft_eval_loss_falls_and_perplexity_is_reported(sft_full):
    out, result = sft_full
    losses = eval_history(out, "eval_loss")
    perplexities = eval_history(out, "eval_perplexity")
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]
    assert perplexities == pytest.approx([min(torch.tensor(l).exp().item(), 1e30) for l in losses], rel=1e-4)
    assert "SFT done: eval perplexity" in result.stdout
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval_perplexity"] < 5


def test_sft_output_loads_back_and_generates_the_demo_answers(sft_full):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sft_full[0]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("\n\nHuman: What color is the sky?\n\nAssistant:", return_tensors="pt")
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    text = tokenizer.decode(answer)
    assert text.endswith(tokenizer.eos_token), "learned to stop"
    assert any(polite.split("{a}")[-1].strip() in text for polite in synthetic._POLITE), text
    assert runs.checkpoint_is_complete(next(out.glob("checkpoint-*")))
    assert not (out / ".saving").exists()


def test_reward_from_sft_output_ranks_chosen_above_rejected(reward_from_sft):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, result = reward_from_sft
    accuracies = eval_history(out, "eval_accuracy")
    losses = eval_history(out, "eval_loss")
    # Chance is 0.5. 60% of the rejected answers are wrong but polite, which a short run on the tiny model does not
    # learn to spot (see README, What to expect); a model that only learned manners scores 0.4 + 0.6 * 0.5 = 0.7.
    assert accuracies[-1] > 0.62, accuracies
    assert losses[-1] < 0.8 * losses[0], losses  # it learned: the pairwise loss fell from its start
    assert "Reward model done: eval accuracy" in result.stdout and "eval_margin" in result.stdout

    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    rows = synthetic.synthetic_preference_rows(128, seed=99)
    def score(texts):
        batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**batch).logits[:, 0]
    rude = [r for r in rows if not synthetic.check_synthetic_answer(r["prompt"], r["rejected"])["polite"]]
    chosen = score([r["prompt"] + r["chosen"] for r in rude])
    rejected = score([r["prompt"] + r["rejected"] for r in rude])
    assert len(rude) > 10 and (chosen > rejected).float().mean() > 0.9  # manners: learned


@pytest.mark.slow
def test_sft_lora_under_deepspeed_zero2_offload_with_merge(script_env, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    result = run(accelerate_script("sft.py", *DEMO_SFT, "--output_dir", tmp_path, "--use_peft", "--lora_r", "8",
                                   "--lora_alpha", "16", "--learning_rate", "1e-2", "--merge_adapter", *QUICK),
                 script_env)
    assert "running as DEEPSPEED with 1 process(es)" in result.stdout + result.stderr
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "merged" / "config.json").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-4)
        with adapter.disable_adapter():
            assert not torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-4), "LoRA learned nothing"
    assert "SFT done" in result.stdout


@pytest.mark.slow
def test_reward_lora_under_deepspeed_trains_and_saves_the_score_head(script_env, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    run(accelerate_script("reward.py", *DEMO_REWARD, "--output_dir", tmp_path, "--use_peft", "--lora_r", "8",
                          "--lora_alpha", "16", "--learning_rate", "1e-2", "--merge_adapter", *QUICK), script_env)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any("score" in name for name in weights), "the score head must be saved with the adapter"
    model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    merged = models.load_model(_model_args(str(tmp_path / "merged")), _seq_cls(), num_labels=1)
    ids = torch.tensor([[5, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)


def _model_args(path, **kwargs):
    from trl import ModelConfig

    return ModelConfig(model_name_or_path=path, **kwargs)


def _seq_cls():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


@pytest.mark.slow  # a training run: the slow tier
def test_sft_with_4bit_lora_and_gradient_checkpointing(script_env, tmp_path):
    result = run(python_script("sft.py", *DEMO_SFT, "--output_dir", tmp_path, "--use_peft", "--load_in_4bit",
                               "--lora_r", "8", "--gradient_checkpointing", "true", "--max_length", "96", *QUICK),
                 script_env)
    losses = [json.loads(line.replace("'", '"'))["loss"] for line in result.stdout.splitlines()
              if line.startswith("{'loss'")]
    assert len(losses) == 3 and all(float(loss) == float(loss) for loss in losses)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow  # a training run: the slow tier
def test_reward_with_4bit_lora_from_an_sft_adapter(script_env, tmp_path):
    """QLoRA reward model, starting from an SFT LoRA adapter (merged into its base on load)."""
    sft = tmp_path / "sft"
    run(python_script("sft.py", *DEMO_SFT, "--output_dir", sft, "--use_peft", "--lora_r", "4", *QUICK), script_env)
    run(python_script("reward.py", *DEMO_REWARD, "--model_name_or_path", sft, "--output_dir", tmp_path / "rm",
                      "--use_peft", "--load_in_4bit", "--lora_r", "4", *QUICK), script_env)
    assert (tmp_path / "rm" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # a training run: the slow tier
def test_resume_continues_exactly_where_the_run_stopped(script_env, tmp_path):
    """4 steps uninterrupted == 2 steps, a crash, and a resume from the last complete checkpoint."""
    args = [*DEMO_SFT, "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no", "--max_eval_samples", "16",
            "--max_train_samples", "128", "--logging_steps", "1"]
    run(python_script("sft.py", *args, "--output_dir", tmp_path / "whole"), script_env)

    # The interrupted run: its checkpoint-2 is complete, its checkpoint-4 was cut off while being written.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    for step in (2, 4):
        (interrupted / f"checkpoint-{step}").symlink_to(tmp_path / "whole" / f"checkpoint-{step}")
    (interrupted / "checkpoint-4").unlink()
    half = interrupted / "checkpoint-4"
    half.mkdir()
    (half / "config.json").write_text("{")
    result = run(python_script("sft.py", *args, "--output_dir", interrupted, "--resume_from_checkpoint", "true"),
                 script_env)
    assert f"resuming from {interrupted / 'checkpoint-2'}" in result.stderr
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-6), name


@pytest.mark.slow  # a training run: the slow tier
def test_reward_model_whose_tokenizer_has_no_pad_token(script_env, tmp_path):
    """A GPT-2-style model and tokenizer without a pad token: EOS is used for padding, scores are finite."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = models.load_tokenizer(models.resolve_model_path(models.BUILTIN_MODEL))
    tokenizer.pad_token = None
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "gpt2-tiny")
    tokenizer.save_pretrained(tmp_path / "gpt2-tiny")
    assert json.loads((tmp_path / "gpt2-tiny" / "tokenizer_config.json").read_text()).get("pad_token") is None
    # Through `accelerate launch` without a config file: one plain process.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    run([*launch, "reward.py", *DEMO_REWARD, "--model_name_or_path", tmp_path / "gpt2-tiny", "--output_dir",
         tmp_path / "rm", *QUICK], script_env)
    metrics = json.loads((tmp_path / "rm" / "eval_results.json").read_text())
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] == metrics["eval_loss"]


@pytest.mark.parametrize("script, extra, message", [
    ("sft.py", ["--dataset_name", "missing/data.jsonl"], "--dataset_name missing/data.jsonl: no such file"),
    ("sft.py", ["--model_name_or_path", "./no-such-model"], "--model_name_or_path ./no-such-model: no such folder"),
    ("reward.py", ["--load_in_4bit", "true"], "--load_in_4bit needs --use_peft"),
    ("reward.py", ["--data_split", "1,0,1"], "leaves step 2 (reward) no rows"),
    ("sft.py", ["--max_length", "4"], "max_length=4 is too small for any train row"),
    ("sft.py", ["--resume_from_checkpoint", "nowhere/checkpoint-9"], "--resume_from_checkpoint nowhere/checkpoint-9"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(script_env, tmp_path, capsys, script, extra, message):
    """Called in-process for speed: main() exits 2 with one `error:` line (the subprocess path is tested below)."""
    import reward
    import sft

    module = sft if script == "sft.py" else reward
    config = DEMO_SFT if script == "sft.py" else DEMO_REWARD
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        module.main(*arguments.parse_args(module.ARGUMENTS, [*config, "--output_dir", str(out), *extra]))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, last_line
    assert not out.exists()


def test_bad_column_in_a_user_file_names_file_row_and_column(script_env, tmp_path):
    rows = synthetic.synthetic_preference_rows(30, seed=5)
    rows[17]["rejected"] = ""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(python_script("reward.py", *DEMO_REWARD, "--dataset_name", data, "--output_dir", tmp_path / "out"),
                 script_env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {data} [train]: row 17, column 'rejected' is empty" in result.stderr


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_sft_learns_the_answer_only_unless_told_otherwise(script_env, tmp_path, completion_only_loss):
    """Our tokenized rows (input_ids + completion_mask) become labels with the prompt masked out, by default."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    import sft

    path = models.resolve_model_path(models.BUILTIN_MODEL)
    tokenizer = models.load_tokenizer(path)
    rows = datasets.Dataset.from_list(synthetic.synthetic_preference_rows(4, seed=0))
    encoded, _ = data.tokenize_for_step(rows, tokenizer, "sft", max_length=128)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                     completion_only_loss=completion_only_loss)
    trainer = sft.PerplexitySFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                                       train_dataset=encoded, processing_class=tokenizer)
    for prepared, source in zip(trainer.train_dataset, encoded):
        expected = [t if m or not completion_only_loss else -100
                    for t, m in zip(source["input_ids"], source["completion_mask"])]
        assert prepared["labels"] == expected
        assert prepared["labels"][-1] == tokenizer.eos_token_id, "the model learns to stop"
