"""Time PPO iterations: generation / scoring / update seconds, tokens per second and peak memory.

    python bench/ppo_step.py --config recipes/demo/ppo.yaml --sft_model_path out/demo/sft \
        --reward_model_path out/demo/reward --bench_steps 5
    python bench/ppo_step.py --config recipes/opt-1.3b/ppo.yaml \
        --actor_config ../shared/model-configs/opt-1.3b.json --reward_config ../shared/model-configs/opt-1.3b.json

    python bench/ppo_step.py --config recipes/demo/ppo.yaml --sft_model_path out/demo/sft \
        --reward_model_path out/demo/reward --compare_estimators gae,rloo,grpo --num_generations 4

It runs ppo.py itself (a subprocess) for --bench_steps iterations into a temporary output_dir, then prints the
per-iteration split from metrics.jsonl; the first iteration is reported apart (warm-up). --actor_config /
--reward_config build random-weight models from an architecture config (e.g. OPT-1.3b), saved as temporary
checkpoints in --dtype, with the demo tokenizer: no hub access, the speed and memory of the real architecture.
Any ppo.py flag can be added. --compare_estimators runs the bench once per advantage estimator, each in a fresh
process (a process's peak memory never goes down), with the same flags (--num_generations too, so that every
estimator generates and trains on the same number of sequences), and prints one table.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import HfArgumentParser  # noqa: E402

from simple_rlhf import models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchArguments:
    bench_steps: int = field(default=5, metadata={"help": "PPO iterations to time."})
    actor_config: str | None = field(default=None, metadata={"help": "Build a random-weight actor/SFT policy from "
                                     "this config.json (e.g. ../shared/model-configs/opt-1.3b.json)."})
    reward_config: str | None = field(default=None, metadata={"help": "Build a random-weight reward model (one "
                                      "label) from this config.json."})
    compare_estimators: str | None = field(default=None, metadata={"help": "Comma-separated advantage estimators "
                                           "(e.g. gae,rloo,grpo): one bench each, in its own process, then a table "
                                           "of seconds per iteration and peak memory."})
    json_out: str | None = field(default=None, metadata={"help": "Also write the iterations' metrics to this JSON "
                                 "file (used by --compare_estimators)."})


def build_random(config_file: str, kind: str, target: Path, dtype: str) -> str:
    """A random-weight model of the given architecture, with the demo tokenizer's special tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = models.load_tokenizer(models.resolve_model_path(models.BUILTIN_MODEL))
    config_dict = json.loads(Path(config_file).read_text())
    config = AutoConfig.for_model(**config_dict)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    if kind == "reward":
        config.num_labels = 1
        config.architectures = [config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
    auto = AutoModelForCausalLM if kind == "actor" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = auto.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def flag_value(argv: list[str], flag: str, default: str | None = None) -> str | None:
    """The last value given to `flag` in argv (ppo.py's parser keeps the last one too)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    return values[-1] if values else default


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    bench_args, ppo_argv = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if bench_args.compare_estimators:
        return compare_estimators(bench_args.compare_estimators.split(","), argv)
    if "--total_episodes" in ppo_argv:
        raise SystemExit("error: --total_episodes: the bench runs --bench_steps iterations; leave it out")
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        dtype = flag_value(ppo_argv, "--dtype", "float32")
        dtype = "float32" if dtype in (None, "auto") else dtype
        extra = []
        if bench_args.actor_config:
            extra += ["--sft_model_path", build_random(bench_args.actor_config, "actor", Path(tmp) / "actor", dtype)]
        if bench_args.reward_config:
            extra += ["--reward_model_path",
                      build_random(bench_args.reward_config, "reward", Path(tmp) / "reward", dtype)]
        output_dir = Path(tmp) / "ppo"
        # Flags after the user's win: a fresh run of exactly --bench_steps iterations, no checkpoints or samples.
        command = [sys.executable, str(ROOT / "ppo.py"), *ppo_argv, *extra, "--output_dir", str(output_dir),
                   "--max_steps", str(bench_args.bench_steps), "--save_steps", str(10**9), "--sample_every", "0",
                   "--resume_from_checkpoint", "false", "--overwrite_output_dir", "false"]
        finished = subprocess.run(command)
        if finished.returncode != 0:
            sys.exit(finished.returncode)
        history = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    if not history:
        return
    if bench_args.json_out:
        Path(bench_args.json_out).write_text(json.dumps(history))
    report(history)


def compare_estimators(estimators: list[str], argv: list[str]) -> None:
    """One bench per estimator, each a fresh process; then seconds per iteration (mean after the first) and peak
    memory side by side."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-compare-") as tmp:
        for estimator in estimators:
            out = Path(tmp) / f"{estimator}.json"
            # The parser keeps a flag's last value: these override the user's (and turn the comparison off).
            command = [sys.executable, __file__, *argv, "--compare_estimators", "", "--advantage_estimator", estimator,
                       "--json_out", str(out)]
            print(f"--- {estimator}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)
            rows[estimator] = json.loads(out.read_text())
    unit = "CUDA max allocated" if _cuda() else "CPU max RSS"
    print(f"\n{'estimator':>10} {'generation':>11} {'scoring':>9} {'update':>9} {'total':>9} {'peak memory':>12}   "
          f"(seconds per iteration, mean of iterations 2..N; peak memory: {unit})")
    for estimator, history in rows.items():
        later = history[1:] or history
        split = [statistics.mean(m[k] for m in later) for k in ("time/generation_s", "time/scoring_s", "time/update_s")]
        peak = max(m["memory/peak_gb"] for m in history)
        print(f"{estimator:>10} {split[0]:>10.3f}s {split[1]:>8.3f}s {split[2]:>8.3f}s {sum(split):>8.3f}s "
              f"{peak:>8.2f} GiB")


def report(history):
    keys = ("time/generation_s", "time/scoring_s", "time/update_s")
    rows = [history[0]] + ([] if len(history) == 1 else [None])
    global_batch = history[0]["episode"] // history[0]["step"]
    print(f"\nPPO bench: {len(history)} iterations, rollout batch {global_batch} over all processes")
    print(f"{'':>22} {'generation':>11} {'scoring':>9} {'update':>9} {'total':>9} {'tokens/s':>9}")

    def line(name, ms):
        values = [statistics.mean(m[k] for m in ms) for k in keys]
        tokens = statistics.mean(m["tokens_per_s"] for m in ms)
        print(f"{name:>22} {values[0]:>10.3f}s {values[1]:>8.3f}s {values[2]:>8.3f}s {sum(values):>8.3f}s "
              f"{tokens:>9.1f}")

    line("first (warm-up)", history[:1])
    if len(rows) > 1:
        line(f"mean of next {len(history) - 1}", history[1:])
    print(f"mean response length {statistics.mean(m['response_length_avg'] for m in history):.1f} tokens; "
          f"peak memory {max(m['memory/peak_gb'] for m in history):.2f} GiB "
          f"({'CUDA max allocated' if history[-1].get('memory/peak_gb') and _cuda() else 'CPU max RSS'})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
