"""memory_plan's arithmetic against what torch allocates, on the CPU.

    python bench/memory_validate.py                  # every case, OPT-125m architecture (../shared)
    python bench/memory_validate.py --cases 0 3      # some of them
    python bench/memory.py --validate                # the same

Each case runs in its own process: the step's real code (TRL's SFTTrainer / RewardTrainer / DPOTrainer as sft.py,
reward.py and dpo.py build them, or ppo.main itself) on a random-weight model, two optimizer steps, sequences of
exactly the planned length, plain python (no DeepSpeed), under torch.profiler with profile_memory=True. The
measured peak is the largest number of bytes of live tensors at any moment: the model's tensors, built before
profiling, plus the profiler's running total of what the CPU allocator handed out and took back. The prediction is
memory_plan's peak of tensors (Plan.allocated: everything but the margin, which only a GPU can confirm) for the same
arguments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simple_rlhf import arguments, data, memory, memory_plan, models, runs  # noqa: E402

SHARED = ROOT.parent / "shared"
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class Case:
    step: str
    use_peft: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora_dropout: float = 0.0
    batch: int = 4
    length: int = 128  # sft / reward: the sequence; ppo: the prompt
    response: int = 32  # ppo
    generation_batch: int = 4  # ppo
    accumulation: int = 2  # micro-batches per optimizer step (2: gradients live across micro-batches, as in recipes)

    def name(self) -> str:
        parts = [self.step, "LoRA" if self.use_peft else "full", self.dtype.replace("bfloat16", "bf16")
                 .replace("float32", "fp32")]
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.lora_dropout:
            parts.append(f"LoRA dropout {self.lora_dropout}")
        shape = f"{self.batch}x{self.length}" if self.step != "ppo" else \
            f"{self.batch}x({self.length}+{self.response}), generation batch {self.generation_batch}"
        return ", ".join(parts) + f", batch {shape}"


CASES = [
    Case("sft"),
    Case("sft", use_peft=True, gradient_checkpointing=True),
    # bf16 backward passes run at a fraction of a GFLOP/s on CPUs without native bf16: small and short
    Case("sft", use_peft=True, dtype="bfloat16", lora_dropout=0.05, batch=2, length=32, accumulation=1),
    Case("reward", batch=2),
    Case("reward", use_peft=True, dtype="bfloat16", gradient_checkpointing=True, batch=1, length=32,
         accumulation=1),
    Case("ppo", use_peft=True, gradient_checkpointing=True, batch=2, length=64, response=32, generation_batch=4),
    Case("ppo", use_peft=True, batch=2, length=64, response=32, generation_batch=2),
    Case("ppo", batch=2, length=64, response=32, generation_batch=2),
    Case("dpo", batch=2),  # full fine-tuning: the reference is a frozen copy
    Case("dpo", use_peft=True, gradient_checkpointing=True, batch=2),  # the reference is the policy, LoRA off
]


def arch_folder(folder: Path, config_file: str | None = None) -> Path:
    """A folder with the config.json of the architecture to measure, and a tokenizer (GPT-2's or the demo's)."""
    from transformers import AutoConfig, OPTConfig

    if config_file:
        config = AutoConfig.for_model(**json.loads(Path(config_file).read_text()))
        tokenizer_path = SHARED / "tokenizers" / "gpt2"
    else:  # a small OPT, for the test: hidden 256, 4 layers, the demo tokenizer's vocabulary
        tokenizer_path = Path(models.resolve_model_path(models.BUILTIN_MODEL))
        config = OPTConfig(vocab_size=640, hidden_size=256, word_embed_proj_dim=256, num_hidden_layers=4,
                           ffn_dim=1024, num_attention_heads=4, max_position_embeddings=1024, dropout=0.1)
    tokenizer = models.load_tokenizer(str(tokenizer_path))
    config.pad_token_id = config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    config.dtype = "float32"
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tensor_bytes(*modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers."""
    storages = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profiled_peak(run) -> int:
    """Run `run()` under torch.profiler; the largest running total of CPU allocations minus frees, in bytes."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            peak = max(peak, event.typed[1].total_allocated)
    return peak


def random_rows(case: Case, vocab: int, n: int, seed: int = 0) -> list[dict]:
    """Token rows of exactly the planned length (prompt half, answer half), as simple_rlhf.data.tokenize_for_step makes them."""
    import random

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    half = case.length // 2
    if case.step == "sft":
        return [{"input_ids": ids(case.length), "completion_mask": [0] * half + [1] * (case.length - half)}
                for _ in range(n)]
    if case.step == "dpo":
        answer = case.length - half
        return [{"prompt_ids": ids(half), "chosen_ids": ids(answer), "rejected_ids": ids(answer)} for _ in range(n)]
    return [{"chosen_ids": (p := ids(half)) + ids(case.length - half), "rejected_ids": p + ids(case.length - half)}
            for _ in range(n)]


def trainer_arguments(case: Case, arch: Path, output_dir: str):
    from trl import DPOConfig, ModelConfig, RewardConfig, SFTConfig

    config_class = {"sft": SFTConfig, "dpo": DPOConfig}.get(case.step, RewardConfig)
    args = config_class(output_dir=output_dir, per_device_train_batch_size=case.batch,
                        gradient_accumulation_steps=case.accumulation,
                        max_steps=2, bf16=case.dtype == "bfloat16", use_cpu=True,
                        gradient_checkpointing=case.gradient_checkpointing, save_strategy="no", eval_strategy="no",
                        report_to="none", logging_steps=1, max_length=case.length, per_device_eval_batch_size=1,
                        dataloader_num_workers=0, disable_tqdm=True)
    model_args = ModelConfig(model_name_or_path=str(arch), dtype=case.dtype, use_peft=case.use_peft, lora_r=16,
                             lora_alpha=32, lora_dropout=case.lora_dropout, lora_target_modules=TARGETS)
    return args, model_args


def measure_trainer_step(case: Case, arch: Path) -> dict:
    """sft.py / reward.py / dpo.py's trainer on random weights: (predicted, measured) peak bytes of live tensors."""
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOTrainer, RewardTrainer, SFTTrainer, get_peft_config

    class PreTokenizedDPOTrainer(DPOTrainer):  # as dpo.py's: the rows are tokenized already
        def _prepare_dataset(self, dataset, *args):
            return dataset

    tokenizer = models.load_tokenizer(str(arch))
    config = AutoConfig.from_pretrained(arch)
    with tempfile.TemporaryDirectory() as tmp:
        args, model_args = trainer_arguments(case, arch, tmp)
        torch.manual_seed(0)
        extra = {}
        if case.step in ("sft", "dpo"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case.dtype))
            trainer_class = SFTTrainer
            if case.step == "dpo":  # full fine-tuning: a frozen copy as the reference, as dpo.py loads it
                trainer_class = PreTokenizedDPOTrainer
                extra["ref_model"] = None if case.use_peft else \
                    AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case.dtype))
                for built in (model, extra["ref_model"]):  # dpo.py turns OPT's functional dropout off too
                    if built is not None:
                        models.disable_dropout(built)
        else:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, case.dtype))
            trainer_class = RewardTrainer
            model_args.lora_task_type = "SEQ_CLS"  # as reward.py does
        rows = datasets.Dataset.from_list(random_rows(case, config.vocab_size, 4 * case.batch))
        static = tensor_bytes(model, *[m for m in extra.values() if m is not None])

        def run():
            trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                    peft_config=get_peft_config(model_args), **extra)
            trainer.train()

        measured = static + profiled_peak(run)
        setup = memory_plan.setup_from_args(case.step, args, model_args, memory.Launch())
        plan = memory_plan.make_plan(replace(setup, device="cpu"))
    return {"predicted": plan.allocated, "measured": measured, "phases": plan.phases}


def prompts_file(folder: Path, case: Case, tokenizer) -> str:
    """Prompts whose last turn is exactly max_prompt_length tokens (an earlier turn is too long to keep): ppo.py cuts
    each to that turn, so every query is max_prompt_length tokens, as the plan assumes."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and then it went to see the old dog near the river bank".split()
    budget = case.length - len(data.special_prefix(tokenizer))
    path = folder / "prompts.jsonl"
    with path.open("w") as out:
        for _ in range(200):
            turn, text = "", ""
            while len(tokenizer(f"\n\nHuman: {text}\n\nAssistant:", add_special_tokens=False)["input_ids"]) <= budget:
                turn = f"\n\nHuman: {text}\n\nAssistant:"
                text = f"{text} {rng.choice(words)}".strip()
            earlier = " ".join(rng.choice(words) for _ in range(2 * case.length))
            row = {"prompt": f"\n\nHuman: {earlier}\n\nAssistant: I see.{turn}", "chosen": " yes", "rejected": " no"}
            out.write(json.dumps(row) + "\n")
    return str(path)


def measure_ppo(case: Case, arch: Path) -> dict:
    """ppo.main on random weights, two iterations; the models are built before profiling and handed to ppo.py in
    place of loading (which maps safetensors files, outside the allocator the profiler sees)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    import ppo

    tokenizer = models.load_tokenizer(str(arch))
    config = AutoConfig.from_pretrained(arch)
    torch.manual_seed(0)
    built = {AutoModelForCausalLM: AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case.dtype))}
    reward_config = AutoConfig.from_pretrained(arch, num_labels=1)
    reward_config.architectures = ["OPTForSequenceClassification"]
    built[AutoModelForSequenceClassification] = AutoModelForSequenceClassification.from_config(
        reward_config, dtype=getattr(torch, case.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        reward_dir = Path(tmp) / "reward"
        reward_config.save_pretrained(reward_dir)  # ppo.validate reads it: a sequence classifier with one label
        tokenizer.save_pretrained(reward_dir)
        prompts = prompts_file(Path(tmp), case, tokenizer)
        data_args, args, model_args = arguments.parse_args((data.DataArguments, ppo.PPOArguments, ppo.ModelConfig), [
            "--sft_model_path", str(arch), "--reward_model_path", str(reward_dir), "--dataset_name", prompts,
            "--output_dir", str(Path(tmp) / "ppo"), "--max_prompt_length", str(case.length),
            "--response_length", str(case.response), "--per_device_train_batch_size", str(case.batch),
            "--gradient_accumulation_steps", str(case.accumulation), "--num_mini_batches", "1",
            "--generation_batch_size", str(case.generation_batch), "--num_ppo_epochs", "1", "--max_steps", "2",
            "--gradient_checkpointing", str(case.gradient_checkpointing), "--bf16", str(case.dtype == "bfloat16"),
            "--dtype", case.dtype, "--use_peft", str(case.use_peft), "--lora_r", "16", "--lora_alpha", "32",
            "--lora_dropout", "0", "--lora_target_modules", *TARGETS, "--temperature", "1.0", "--sample_every", "0",
            "--stop_token", "eos", "--use_cpu", "true"])
        models.load_model = lambda model_args, auto_class, path=None, flag="", **kwargs: built[auto_class]
        static = tensor_bytes(*built.values())
        history = []
        measured = static + profiled_peak(lambda: history.extend(ppo.main(data_args, args, model_args)))
        setup = memory_plan.setup_from_args("ppo", args, model_args, memory.Launch())
        plan = memory_plan.make_plan(replace(setup, device="cpu"))
    lengths = [round(m["response_length_avg"], 1) for m in history]
    return {"predicted": plan.allocated, "measured": measured, "phases": plan.phases, "response_lengths": lengths}


def measure(case: Case, arch: Path) -> dict:
    return measure_ppo(case, arch) if case.step == "ppo" else measure_trainer_step(case, arch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))))
    parser.add_argument("--arch", default=str(SHARED / "model-configs" / "opt-125m.json"),
                        help="an architecture config.json (default: OPT-125m from ../shared); 'small' for a 4-layer OPT")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one case in this process
    parser.add_argument("--arch_dir", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    runs.setup_logging(False)
    if options.one is not None:
        print("RESULT " + json.dumps(measure(CASES[options.one], Path(options.arch_dir))))
        return
    if options.arch != "small" and not Path(options.arch).exists():
        raise SystemExit(f"error: --arch {options.arch}: no such file (../shared absent? use --arch small)")
    rows = [["case", "predicted MiB", "measured MiB", "error"]]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        arch = arch_folder(Path(tmp) / "arch", None if options.arch == "small" else options.arch)
        for index in options.cases:
            result = subprocess.run([sys.executable, __file__, "--one", str(index), "--arch_dir", str(arch)],
                                    capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "HF_HUB_OFFLINE": "1"})
            found = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode or not found:
                raise SystemExit(f"error: case {index} failed:\n{result.stderr[-3000:]}")
            value = json.loads(found[0][len("RESULT "):])
            error = value["predicted"] / value["measured"] - 1
            errors.append(abs(error))
            rows.append([f"{index}. {CASES[index].name()}", f"{value['predicted'] / 2**20:.0f}",
                         f"{value['measured'] / 2**20:.0f}", f"{error:+.1%}"])
            print(f"case {index}: {json.dumps(value)}", flush=True)
    print(f"\nmemory_plan against torch's allocations on the CPU ({Path(options.arch).stem} architecture, random "
          "weights, plain python):")
    runs.print_table(rows)
    print(f"largest error {max(errors):.1%}, mean absolute error {sum(errors) / len(errors):.1%}")


if __name__ == "__main__":
    main()
