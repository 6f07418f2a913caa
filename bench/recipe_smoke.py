"""Run every step of a GPU recipe on the CPU, with the real architectures and random weights.

    python bench/recipe_smoke.py --preset opt-1.3b                  # sft, reward, ppo (see README for times)
    python bench/recipe_smoke.py --work_dir out/smoke --steps sft   # one step per call; later calls reuse it

Each step is `accelerate launch --config_file accelerate_config.yaml <step>.py --config recipes/PRESET/<step>.yaml`
as the recipe is written (LoRA targets and ranks, bf16, gradient checkpointing, DeepSpeed ZeRO-2 with the optimizer
on the CPU, merging, evaluation, tensorboard), with only lengths, batch sizes and step counts overridden (SHRINK
below) so that it finishes on a CPU: 1-2 optimizer steps per step. The models are the recipe's architectures
(../shared/model-configs) with random weights, built once in bf16 and kept in $SIMPLE_RLHF_CACHE/random-models;
the tokenizer is GPT-2's (../shared/tokenizers/gpt2, which is OPT's); the data a small subset of
../shared/data/hh-rlhf-static written to a temporary folder. It prints the seconds each step took and checks what
each step wrote (adapter ranks and targets, merged model, DeepSpeed's ZeRO-2 offload in the log).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from simple_rlhf import data, errors, models, runs  # noqa: E402

# The recipe's model names -> the architecture configs they stand for.
ARCHITECTURES = {"facebook/opt-1.3b": "opt-1.3b", "facebook/opt-350m": "opt-350m", "facebook/opt-125m": "opt-125m"}
# What is overridden: sizes and counts only. bf16 training is slow on CPUs without native bf16 (about 10 s per token
# for an OPT-1.3b backward pass on 2 AVX2 cores), so the sequences are a dozen tokens and each step takes 1-2
# optimizer steps.
SHRINK = {
    "sft": ["--max_length", "12", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--max_steps", "2", "--per_device_eval_batch_size", "1", "--max_eval_samples", "1"],
    "reward": ["--max_length", "12", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
               "--max_steps", "2", "--per_device_eval_batch_size", "1", "--max_eval_samples", "1"],
    # a rollout of 1 prompt: one PPO iteration with one optimizer step
    "ppo": ["--max_prompt_length", "12", "--response_length", "4", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--num_mini_batches", "1", "--generation_batch_size", "1",
            "--total_episodes", "1"],
}
MAX_ANSWER_CHARS = 30  # rows whose answers fit max_length 12 (at most 9 GPT-2 tokens + EOS)


def recipe(preset: str, step: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / preset / f"{step}.yaml").read_text())


def random_model(name: str, cache: Path) -> str:
    """The architecture behind a recipe's hub id with random weights, bf16, and the GPT-2 tokenizer; built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise errors.UserError(f"{name}: no architecture config for it in ../shared/model-configs")
    path = cache / f"{arch}-random-bf16"
    if (path / "config.json").exists():
        return str(path)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    config = AutoConfig.for_model(**json.loads((SHARED / "model-configs" / f"{arch}.json").read_text()))
    # The GPT-2 tokenizer's special tokens, so that generation stops and padding is read where the scripts expect.
    config.pad_token_id = config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = Path(f"{path}.partial")
    model.save_pretrained(partial)  # safetensors
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    print(f"built {arch} with random weights in {path} ({time.perf_counter() - started:.0f}s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters)", flush=True)
    return str(path)


def write_data(folder: Path) -> str:
    """A folder with train.jsonl and test.jsonl: the hh-rlhf-static rows whose answers are short enough to survive
    the shortened max_length (the prompts are cut from the left)."""
    data = folder / "hh-subset"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [line for line in (SHARED / "data" / "hh-rlhf-static" / f"{split}.jsonl").read_text().splitlines()
                if all(len(json.loads(line)[k]) <= MAX_ANSWER_CHARS for k in ("chosen", "rejected"))]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return str(data)


def run_step(step: str, preset: str, args: list[str], log: Path) -> float:
    """accelerate launch the step with the recipe + args; its output goes to `log` and, filtered, to the screen."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
               f"{step}.py", "--config", f"recipes/{preset}/{step}.yaml", *args]
    print(f"\n[{step}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    # bf16 matrix products are slow on CPUs without native bf16: use every core (run it alone: cpu-run).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    text = log.read_text()
    for line in text.splitlines():
        if any(key in line for key in ("memory estimate", "done:", "error:", "Error", "CPU Offload", "Reduce bucket",
                                       "Gradient checkpointing", "gradient_checkpointing")):
            print(f"[{step}] {line[:300]}", flush=True)
    if result.returncode != 0:
        print("\n".join(text.splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(f"error: {step} exited {result.returncode}; its log is {log}")
    return seconds


def check_outputs(step: str, output: Path, config: dict, log: Path) -> list[str]:
    """What the recipe turned on, found in what the step wrote; an empty list when everything is there."""
    problems = []
    text = log.read_text()
    # accelerate launch hands accelerate_config.yaml to the step: its memory line says how it was launched
    if "running as DEEPSPEED" not in text or "DeepSpeed ZeRO-2, optimizer on CPU" not in text:
        problems.append("the step did not run under DeepSpeed ZeRO-2 with the optimizer on the CPU")
    if config.get("use_peft"):
        adapter = json.loads((output / "adapter_config.json").read_text())
        if adapter["r"] != config["lora_r"] or sorted(adapter["target_modules"]) != sorted(config["lora_target_modules"]):
            problems.append(f"adapter r={adapter['r']} targets {adapter['target_modules']} differ from the recipe")
    if config.get("merge_adapter") and not (output / "merged" / "config.json").exists():
        problems.append("no merged model")
    if config.get("report_to") == "tensorboard" and not list(output.rglob("events.out.tfevents*")):
        problems.append("no tensorboard events")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="opt-1.3b", help="recipes/PRESET/{sft,reward,ppo}.yaml")
    parser.add_argument("--steps", nargs="+", default=list(data.STEPS), choices=data.STEPS,
                        help="steps to run; a later step needs the earlier ones' outputs in --work_dir")
    parser.add_argument("--work_dir", default=None, help="keep the outputs, logs and times here; a step finished "
                        "there is not run again, so the steps can run one call at a time (default: a temporary "
                        "folder, all steps)")
    options = parser.parse_args(argv)
    for needed in ("model-configs", "tokenizers/gpt2", "data/hh-rlhf-static/train.jsonl"):
        if not (SHARED / needed).exists():
            raise SystemExit(f"error: {SHARED / needed} is absent; this benchmark needs ../shared")
    cache = models.cache_dir() / "random-models"
    cache.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="recipe-smoke-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_path = write_data(work)
        out = {step: work / step for step in data.STEPS}
        configs = {step: recipe(options.preset, step) for step in data.STEPS}
        times_file = work / "seconds.json"
        times = json.loads(times_file.read_text()) if times_file.exists() else {}
        for step in data.STEPS:
            if step in times or step not in options.steps:
                continue
            if step == "ppo":
                if not {"sft", "reward"} <= set(times):
                    raise SystemExit(f"error: ppo needs the sft and reward outputs in {work}; run those steps first")
                # train.py's wiring: the SFT output's merged model is the policy, the reward output the reward model
                model_flags = ["--sft_model_path", str(out["sft"] / "merged"), "--reward_model_path", str(out["reward"])]
            else:
                model_flags = ["--model_name_or_path", random_model(configs[step]["model_name_or_path"], cache)]
            args = [*model_flags, "--dataset_name", data_path, "--output_dir", str(out[step]), *SHRINK[step]]
            seconds = run_step(step, options.preset, args, work / f"{step}.log")
            problems = check_outputs(step, out[step], configs[step], work / f"{step}.log")
            if problems:
                raise SystemExit(f"error: {step}: " + "; ".join(problems))
            times[step] = seconds
            runs.write_json(times_file, times)
        print(f"\nrecipes/{options.preset} on the CPU, real architectures with random weights (wall time of each "
              "accelerate launch, loading and saving included):")
        runs.print_table([["step", "seconds", "overrides"]] +
                           [[s, f"{times[s]:.0f}", " ".join(SHRINK[s])] for s in data.STEPS if s in times])


if __name__ == "__main__":
    main()
