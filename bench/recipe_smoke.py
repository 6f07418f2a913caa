"""Run every step of a GPU recipe on the CPU, with the real architectures and random weights.

    python bench/recipe_smoke.py --preset opt-1.3b                 # sft, reward, ppo: minutes on 2 cores, see README
    python bench/recipe_smoke.py --preset opt-1.3b --steps ppo     # PPO only (it needs the earlier outputs: runs them)

Each step is `accelerate launch --config_file accelerate_config.yaml <step>.py --config recipes/PRESET/<step>.yaml`
as the recipe is written (LoRA targets and ranks, bf16, gradient checkpointing, DeepSpeed ZeRO-2 with the optimizer
on the CPU, merging, evaluation, tensorboard), with only lengths, batch sizes and step counts overridden (SHRINK
below) so that it finishes on a CPU: 2 optimizer steps per step. The models are the recipe's architectures
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

import common  # noqa: E402

# The recipe's model names -> the architecture configs they stand for.
ARCHITECTURES = {"facebook/opt-1.3b": "opt-1.3b", "facebook/opt-350m": "opt-350m", "facebook/opt-125m": "opt-125m"}
# What is overridden: sizes and counts only (2 optimizer steps per step).
SHRINK = {
    "sft": ["--max_length", "32", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--max_steps", "2", "--per_device_eval_batch_size", "2", "--max_eval_samples", "2"],
    "reward": ["--max_length", "32", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
               "--max_steps", "2", "--per_device_eval_batch_size", "2", "--max_eval_samples", "2"],
    # rollout of 2 prompts = 2 mini-batches of 1: one PPO iteration, 2 optimizer steps
    "ppo": ["--max_prompt_length", "32", "--response_length", "8", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--num_mini_batches", "2", "--generation_batch_size", "2",
            "--total_episodes", "2"],
}
DATA_ROWS = 400  # each step's share of --data_split 2,4,4, and the 2% held out for evaluation


def recipe(preset: str, step: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / preset / f"{step}.yaml").read_text())


def random_model(name: str, cache: Path) -> str:
    """The architecture behind a recipe's hub id with random weights, bf16, and the GPT-2 tokenizer; built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise common.UserError(f"{name}: no architecture config for it in ../shared/model-configs")
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
    """Rows whose answers are short enough to survive the shortened max_length (prompts are cut from the left)."""
    rows = [line for line in (SHARED / "data" / "hh-rlhf-static" / "train.jsonl").read_text().splitlines()
            if all(len(json.loads(line)[k]) <= 80 for k in ("chosen", "rejected"))][:DATA_ROWS]
    path = folder / "hh-subset.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


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
    if "CPU Offload: True" not in text:  # DeepSpeed's ZeRO-1/2 optimizer logs it when it starts
        problems.append("DeepSpeed did not report CPU Offload: True in the log")
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
    parser.add_argument("--steps", nargs="+", default=list(common.STEPS), choices=common.STEPS,
                        help="steps to time; the earlier steps a later one needs run too")
    parser.add_argument("--work_dir", default=None, help="keep the outputs and logs here (default: a temporary "
                        "folder, removed at the end)")
    options = parser.parse_args(argv)
    for needed in ("model-configs", "tokenizers/gpt2", "data/hh-rlhf-static/train.jsonl"):
        if not (SHARED / needed).exists():
            raise SystemExit(f"error: {SHARED / needed} is absent; this benchmark needs ../shared")
    cache = common.cache_dir() / "random-models"
    cache.mkdir(parents=True, exist_ok=True)
    steps = list(common.STEPS[: max(common.STEPS.index(s) for s in options.steps) + 1])
    if "ppo" in steps and "reward" not in options.steps:
        steps = ["sft", "reward", "ppo"]

    with tempfile.TemporaryDirectory(prefix="recipe-smoke-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = write_data(work)
        out = {step: work / step for step in common.STEPS}
        configs = {step: recipe(options.preset, step) for step in common.STEPS}
        times, problems = {}, []
        for step in steps:
            if step == "ppo":
                # train.py's wiring: the SFT output's merged model is the policy, the reward output the reward model
                sft_out = out["sft"] / "merged" if (out["sft"] / "merged").exists() else out["sft"]
                models = ["--sft_model_path", str(sft_out), "--reward_model_path", str(out["reward"])]
            else:
                models = ["--model_name_or_path", random_model(configs[step]["model_name_or_path"], cache)]
            args = [*models, "--dataset_name", data, "--output_dir", str(out[step]), *SHRINK[step]]
            times[step] = run_step(step, options.preset, args, work / f"{step}.log")
            problems += [f"{step}: {p}" for p in check_outputs(step, out[step], configs[step], work / f"{step}.log")]
        print(f"\nrecipes/{options.preset} on the CPU, real architectures with random weights:")
        common.print_table([["step", "seconds", "overrides"]] +
                           [[s, f"{times[s]:.0f}", " ".join(SHRINK[s])] for s in steps])
        if problems:
            raise SystemExit("error: " + "; ".join(problems))


if __name__ == "__main__":
    main()
