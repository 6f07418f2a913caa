"""Does RLHF make the model better? SFT -> reward model -> PPO -> evaluation, over seeds, in one table.

    python bench/learning.py --task demo --seeds 3
    python bench/learning.py --task smollm2-synthetic --seeds 3 --model_path HuggingFaceTB/SmolLM2-135M-Instruct
    python bench/learning.py --task smollm2-hh --seeds 1 --ppo_args "--max_steps 20"

Each seed runs train.py (the task's preset, plain python, `--seed S` for every step) into OUTPUT_DIR/TASK/seed-S,
then evaluate.py on held-out data with the base, SFT and PPO policies, and the SFT policy's best of N answers by the
reward model (`sft-best-of-N`, --best_of_n: the reward model's worth with no RL). The table gives, as mean ± std over
seeds (and each seed's value): the reward model's held-out accuracy (per flaw of the rejected answer on the synthetic
tasks); per policy the ground-truth shares of answers that are correct, polite and both (synthetic tasks; checked by
code, simple_rlhf.synthetic.check_synthetic_answer) and the reward model's agreement with that ground truth on the
policy's own answers (rm_auc, rm_auc_correct), the reward model's win rate over SFT, the KL to the SFT policy (for
best-of-N its analytic bound, kl_to_reference_bound), the mean length and the EOS rate; the wall time of each step.
Finished steps are reused (train.py's own skip); --force trains again; so `--seeds 1`, then `--seeds 2`, ... add one
seed per call (each call short, the last prints all).
--sft_args / --reward_args / --ppo_args / --eval_args are passed through. --estimators gae,rloo,grpo adds one PPO
run per advantage estimator on each seed's SFT and reward models, evaluated beside the recipe's PPO.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simple_rlhf import data, errors, models, runs, synthetic  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
HH_DATA = str(ROOT.parent / "shared" / "data" / "hh-rlhf-static")
# Per task: train.py's preset, the dataset, which model the reward model starts from, the base policy, the
# evaluation's answer length (the PPO recipe's response_length) and its default best-of-N (--best_of_n; small for the
# quick demo, 0 for hh, whose 48-token answers make N samples per prompt a long job on a CPU).
TASKS = {
    "demo": dict(preset="demo", dataset=synthetic.BUILTIN_DATASET, reward_model="sft", base=models.BUILTIN_MODEL,
                 response_length=10, best_of_n=4),
    "smollm2-synthetic": dict(preset="smollm2", dataset=synthetic.BUILTIN_DATASET, reward_model="sft", base=None,
                              response_length=24, best_of_n=16,
                              # The recipe's --kl_budget guards against over-optimising the learned reward model; the
                              # ground truth cannot be over-optimised: its runs go on, 50 iterations (~14 min alone).
                              truth_ppo_args="--kl_budget 0 --max_steps 50"),
    "smollm2-hh": dict(preset="smollm2", dataset=HH_DATA, reward_model="recipe", base=None, response_length=48,
                       best_of_n=0,
                       sft_args="--max_length 256", reward_args="--max_length 256",
                       ppo_args="--max_prompt_length 192 --response_length 48"),
}
POLICIES = ("base", "sft", "ppo")


@dataclass
class LearningArguments:
    task: str = field(default="demo", metadata={"help": "demo, smollm2-synthetic or smollm2-hh."})
    seeds: int = field(default=3, metadata={"help": "How many seeds (1, 2, ...): each trains all three steps."})
    start_seed: int = field(default=1, metadata={
        "help": "First seed: seeds START_SEED..SEEDS run and enter the table (e.g. --start_seed 2 --seeds 2 in one "
                "process and --start_seed 3 --seeds 3 in another, OMP_NUM_THREADS=1 each; then --seeds 3 prints "
                "the table of all three from their finished runs)."})
    model_path: str = field(default=SMOLLM2, metadata={
        "help": "The SmolLM2-135M-Instruct the smollm2 tasks start from: a hub id or a local folder (offline: "
                "../shared/tools/make-smollm2 OUT_DIR writes one)."})
    output_dir: str = field(default="out/bench/learning", metadata={"help": "Runs go to OUTPUT_DIR/TASK/seed-S."})
    max_prompts: int = field(default=96, metadata={"help": "Held-out prompts each policy answers in evaluation."})
    sft_args: str = field(default="", metadata={"help": "Extra arguments for sft.py (after the task's)."})
    reward_args: str = field(default="", metadata={"help": "Extra arguments for reward.py."})
    ppo_args: str = field(default="", metadata={"help": "Extra arguments for ppo.py, e.g. \"--max_steps 20\"."})
    eval_args: str = field(default="", metadata={"help": "Extra arguments for evaluate.py."})
    reward_sources: str = field(default="model", metadata={
        "help": "What the extra PPO runs optimise, e.g. model,truth: `model` the seed's reward model (on the synthetic "
                "tasks with the ground truth logged beside it at weight 0: gold against proxy), `truth` the task's "
                "ground truth alone (--reward_funcs builtin:synthetic, no reward model; synthetic tasks). One run "
                "per estimator and source, into seed-S/ppo-E (model) or seed-S/ppo-E-truth; with --estimators empty, "
                "`truth` adds seed-S/ppo-truth with the recipe's estimator."})
    methods: str = field(default="ppo", metadata={
        "help": "ppo, or ppo,dpo: also dpo.py (recipes/PRESET/dpo.yaml) from each seed's SFT policy on the same "
                "pairs into seed-S/dpo, evaluated as policy dpo."})
    dpo_args: str = field(default="", metadata={"help": "Extra arguments for dpo.py (with --methods ppo,dpo)."})
    estimators: str = field(default="", metadata={
        "help": "Advantage estimators to compare, e.g. gae,rloo,grpo: after each seed's three steps, one more PPO "
                "run per estimator (same SFT and reward models, same arguments, only --advantage_estimator differs) "
                "into seed-S/ppo-E, evaluated as policy ppo-E. Empty: the recipe's PPO alone."})
    best_of_n: int | None = field(default=None, metadata={
        "help": "Evaluate the SFT policy's best of N answers per prompt by the reward model as policy sft-best-of-N "
                "(evaluate.py --best_of_n). Default: the task's (demo 4, smollm2-synthetic 16, smollm2-hh 0); 0: off."})
    greedy: bool = field(default=False, metadata={
        "help": "Also evaluate the SFT policy and the trained ones greedily (temperature 0.01, evaluate.py into "
                "seed-S/eval-greedy): rows `greedy POLICY correct_rate / both_rate` and `greedy POLICY - sft "
                "both_rate`, whether RL made the most likely answers better, not only the sampled ones."})
    force: bool = field(default=False, metadata={"help": "Train every step again, even where a run finished."})


def best_of_n(args: LearningArguments) -> int:
    return TASKS[args.task]["best_of_n"] if args.best_of_n is None else args.best_of_n


def validate(args: LearningArguments) -> None:
    if args.task not in TASKS:
        raise errors.UserError(f"--task {args.task}: use one of {', '.join(TASKS)}")
    if args.seeds < 1:
        raise errors.UserError(f"--seeds {args.seeds}: must be at least 1")
    if not 1 <= args.start_seed <= args.seeds:
        raise errors.UserError(f"--start_seed {args.start_seed}: must be between 1 and --seeds {args.seeds}")
    if args.best_of_n is not None and args.best_of_n < 0:
        raise errors.UserError(f"--best_of_n {args.best_of_n}: must be at least 0 (0: off)")
    if args.task == "smollm2-hh" and not Path(HH_DATA, "train.jsonl").exists():
        raise errors.UserError(f"--task smollm2-hh: {HH_DATA}/train.jsonl is absent")
    if args.task != "demo" and data.looks_like_local_path(args.model_path) and not Path(args.model_path).is_dir():
        raise errors.UserError(f"--model_path {args.model_path}: no such folder; give SmolLM2-135M-Instruct's folder "
                               f"or the hub id {SMOLLM2}")
    unknown = [e for e in estimator_list(args) if e not in ("gae", "rloo", "grpo")]
    if unknown:
        raise errors.UserError(f"--estimators {args.estimators}: {', '.join(unknown)} is not one of gae, rloo, grpo")
    unknown = [s for s in split(args.reward_sources) if s not in ("model", "truth")] or \
        [m for m in split(args.methods) if m not in ("ppo", "dpo")]
    if unknown or not split(args.reward_sources) or "ppo" not in split(args.methods):
        raise errors.UserError(f"--reward_sources {args.reward_sources} --methods {args.methods}: sources are model "
                               "and truth, methods ppo (always) and dpo")
    if "truth" in split(args.reward_sources) and TASKS[args.task]["dataset"] != synthetic.BUILTIN_DATASET:
        raise errors.UserError(f"--reward_sources truth: --task {args.task} has no ground truth; use a synthetic task")
    for name in ("sft_args", "reward_args", "ppo_args", "eval_args", "dpo_args"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as error:
            raise errors.UserError(f"--{name} {getattr(args, name)!r}: {error}")


def train_command(args: LearningArguments, seed: int, folder: Path) -> list[str]:
    """train.py for one seed: the task's preset and data, the seed in every step, the user's extras last."""
    task = TASKS[args.task]
    common_args = f"--seed {seed} --dataset_name {shlex.quote(task['dataset'])}"
    model = "" if args.task == "demo" else f" --model_name_or_path {shlex.quote(args.model_path)}"
    command = [sys.executable, str(ROOT / "train.py"), "--preset", task["preset"], "--output_dir", str(folder),
               "--accelerate_config", "none", "--reward_model", task["reward_model"],
               "--sft_args", f"{common_args}{model} {task.get('sft_args', '')} {args.sft_args}",
               "--reward_args", f"{common_args}{model if task['reward_model'] == 'recipe' else ''} "
                                f"{task.get('reward_args', '')} {args.reward_args}",
               "--ppo_args", f"{common_args} {shlex.join(gold_logged(args))} {task.get('ppo_args', '')} "
                             f"{args.ppo_args}"]
    return command + (["--force"] if args.force else [])


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def estimator_list(args: LearningArguments) -> list[str]:
    return split(args.estimators)


def extra_runs(args: LearningArguments) -> list[str]:
    """The runs beside train.py's own, by name: ppo-E (the reward model) and ppo-E-truth (the ground truth) per
    estimator E and source, ppo-truth (the recipe's estimator, the ground truth) and dpo."""
    sources = split(args.reward_sources)
    names = [f"ppo-{e}" + ("-truth" if source == "truth" else "") for e in estimator_list(args) for source in sources]
    if not estimator_list(args) and "truth" in sources:
        names.append("ppo-truth")
    return names + (["dpo"] if "dpo" in split(args.methods) else [])


def gold_logged(args: LearningArguments) -> list[str]:
    """On the synthetic tasks every reward-model PPO run logs the ground truth beside the proxy (weight 0)."""
    if TASKS[args.task]["dataset"] != synthetic.BUILTIN_DATASET:
        return []
    return ["--reward_funcs", "builtin:synthetic", "--reward_weights", "1", "0"]


def step_outputs(folder: Path) -> dict[str, str]:
    summary = json.loads((folder / "summary.json").read_text())
    return {step["step"]: step["output"] for step in summary["steps"]}


def extra_command(args: LearningArguments, seed: int, folder: Path, name: str, target: Path) -> list[str]:
    """One extra run as train.py would run its step for this seed (same recipe, models and extras): ppo.py with
    another estimator and/or the ground truth as its reward, or dpo.py from the seed's SFT policy. An interrupted
    attempt resumes from its checkpoint, one that left no checkpoint is replaced."""
    task, outputs = TASKS[args.task], step_outputs(folder)
    common = ["--output_dir", str(target), "--seed", str(seed), "--dataset_name", task["dataset"]]
    if name == "dpo":
        command = [sys.executable, str(ROOT / "dpo.py"), "--config", str(ROOT / "recipes" / task["preset"] / "dpo.yaml"),
                   "--model_name_or_path", outputs["sft"], *common, *shlex.split(task.get("reward_args", "")),
                   *shlex.split(args.dpo_args)]
    else:
        estimator = name.split("-")[1] if name.split("-")[1] != "truth" else None
        reward = ["--reward_model_path", "none", "--reward_funcs", "builtin:synthetic"] if name.endswith("-truth") \
            else ["--reward_model_path", outputs["reward"], *gold_logged(args)]
        command = [sys.executable, str(ROOT / "ppo.py"), "--config", str(ROOT / "recipes" / task["preset"] / "ppo.yaml"),
                   "--sft_model_path", outputs["sft"], *reward, *common, *shlex.split(task.get("ppo_args", "")),
                   *(shlex.split(task.get("truth_ppo_args", "")) if name.endswith("-truth") else []),
                   *shlex.split(args.ppo_args), *(["--advantage_estimator", estimator] if estimator else [])]
    if runs.newest_complete_checkpoint(target) is not None:
        return command + ["--resume_from_checkpoint", "true"]
    return command + (["--overwrite_output_dir", "true"] if target.exists() else [])


def run_extras(args: LearningArguments, seed: int, folder: Path) -> None:
    """Each extra run (extra_runs), skipped where it finished before (unless --force)."""
    for name in extra_runs(args):
        target = folder / name
        finished = (target / "bench_done.json").exists()
        if finished and not args.force:
            continue
        # A finished run trained again is built beside it and replaces it only once it finished (as train.py does).
        build = target.with_name(target.name + ".new") if finished else target
        if build != target:
            shutil.rmtree(build, ignore_errors=True)
        seconds = run(extra_command(args, seed, folder, name, build), folder / "logs" / f"{name}.log")
        runs.write_json(build / "bench_done.json", {"duration_s": round(seconds, 1)})
        if build != target:
            runs.swap_in(build, target)


def eval_command(args: LearningArguments, folder: Path, greedy: bool = False) -> list[str]:
    """evaluate.py on the seed's policies: sampled at temperature 1 with the base policy and best-of-N into
    seed-S/eval, or (greedy) the SFT and trained policies at temperature 0.01 into seed-S/eval-greedy."""
    task = TASKS[args.task]
    outputs = step_outputs(folder)
    policies = [f"sft={outputs['sft']}", f"ppo={outputs['ppo']}"]
    policies += [f"{name}={folder / name}" for name in extra_runs(args)]
    if greedy:
        extra = ["--temperature", "0.01", "--output_dir", str(folder / "eval-greedy")]
    else:
        policies.insert(0, f"base={task['base'] or args.model_path}")
        n = best_of_n(args)
        extra = ["--output_dir", str(folder / "eval"), *(["--best_of_n", str(n)] if n else [])]
    return [sys.executable, str(ROOT / "evaluate.py"), "--dataset_name", task["dataset"],
            "--reward_model_path", outputs["reward"], "--policies", *policies, "--max_prompts", str(args.max_prompts),
            "--response_length", str(task["response_length"]), *extra, *shlex.split(args.eval_args)]


def evaluate(args: LearningArguments, folder: Path, greedy: bool = False) -> float:
    """Run eval_command unless its results are current: evaluated again when a policy is newer than the evaluation,
    or the command (the policies asked for) changed. Returns its wall time."""
    timing = folder / ("eval-greedy" if greedy else "eval") / "bench_eval_time.json"
    finished = [folder / "ppo" / "step_complete.json",
                *(folder / name / "bench_done.json" for name in extra_runs(args))]
    command = eval_command(args, folder, greedy)
    if args.force or not timing.exists() or json.loads(timing.read_text()).get("command") != command or \
            timing.stat().st_mtime < max(path.stat().st_mtime for path in finished):
        seconds = run(command, folder / "logs" / ("bench_eval_greedy.log" if greedy else "bench_eval.log"))
        runs.write_json(timing, {"eval_s": seconds, "command": command})
    return json.loads(timing.read_text())["eval_s"]


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in a log; on failure, stop with the log's tail. Returns its wall time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(command)}  (log: {log})", flush=True)
    started = time.time()
    with log.open("a") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        # `kill PID` (or a timeout) of the bench reaches the step too: train.py lets it checkpoint and stop, and
        # the next call resumes it.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
        try:
            code = process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        print(f"error: {command[1]} exited {code}; see {log}", file=sys.stderr)
        sys.exit(code)
    return time.time() - started


def seed_numbers(args: LearningArguments, folder: Path, eval_seconds: float) -> dict[str, float | None]:
    """One seed's row of numbers, flat: what the table shows (None: no number, e.g. an AUC with one class empty)."""
    summary = json.loads((folder / "summary.json").read_text())
    results = json.loads((folder / "eval" / "eval_results.json").read_text())
    numbers = {"reward accuracy (held-out)": results["reward"]["eval_accuracy"]}
    for flaw, value in results["reward"].get("accuracy_by_flaw", {}).items():
        numbers[f"reward accuracy, rejected {flaw}"] = value
    columns = ["correct_rate", "polite_rate", "both_rate", "rm_auc", "rm_auc_correct", "win_rate_vs_sft",
               "kl_to_reference", "kl_to_reference_bound", "mean_length", "eos_rate", "reward_mean"]
    # The best-of-N row (evaluate.py names it sft-best-of-N) after the trained policies.
    policies = [*POLICIES, *extra_runs(args),
                *(name for name, p in results["policies"].items() if "best_of_n" in p)]
    for name in policies:
        for column in columns:
            if column in results["policies"][name]:
                numbers[f"{name} {column}"] = results["policies"][name][column]
    for name in policies[2:]:
        if "both_rate" in results["policies"][name]:
            numbers[f"{name} - sft both_rate"] = results["policies"][name]["both_rate"] - \
                                                 results["policies"]["sft"]["both_rate"]
    if args.greedy:
        greedy = json.loads((folder / "eval-greedy" / "eval_results.json").read_text())["policies"]
        for name in policies[1:]:
            if name in greedy:
                for column in ("correct_rate", "both_rate"):
                    numbers[f"greedy {name} {column}"] = greedy[name][column]
                if name != "sft":
                    numbers[f"greedy {name} - sft both_rate"] = greedy[name]["both_rate"] - greedy["sft"]["both_rate"]
    for step in summary["steps"]:
        numbers[f"time {step['step']} (s)"] = step["duration_s"]
    for name in extra_runs(args):
        numbers[f"time {name} (s)"] = json.loads((folder / name / "bench_done.json").read_text())["duration_s"]
    numbers["time evaluation (s)"] = eval_seconds
    return numbers


def summarise(per_seed: list[dict[str, float | None]], first_seed: int = 1) -> list[list[str]]:
    """Rows of the table: quantity, mean ± std over the seeds that have a number, and each seed's value ('-' where
    a seed has none: an AUC with one class empty, a quantity a seed did not measure)."""
    rows = [["quantity", "mean ± std"] + [f"seed {first_seed + i}" for i in range(len(per_seed))]]
    for key in dict.fromkeys(key for numbers in per_seed for key in numbers):
        values = [numbers.get(key) for numbers in per_seed]
        present = [v for v in values if v is not None]
        digits = 1 if key.startswith("time") else 3
        if present:
            spread = statistics.stdev(present) if len(present) > 1 else 0.0
            summary = f"{statistics.mean(present):.{digits}f} ± {spread:.{digits}f}"
        else:
            summary = "-"
        rows.append([key, summary] + ["-" if v is None else f"{v:.{digits}f}" for v in values])
    return rows


@errors.exit_on_user_error
def main(args: LearningArguments) -> list[dict]:
    validate(args)
    root = Path(args.output_dir).resolve() / args.task
    per_seed = []
    for seed in range(args.start_seed, args.seeds + 1):
        folder = root / f"seed-{seed}"
        run(train_command(args, seed, folder), folder / "logs" / "bench_train.log")
        run_extras(args, seed, folder)
        seconds = evaluate(args, folder)
        if args.greedy:
            seconds += evaluate(args, folder, greedy=True)
        per_seed.append(seed_numbers(args, folder, seconds))
    n = best_of_n(args)
    print(f"\n{args.task}: seeds {args.start_seed}-{args.seeds}; policies sampled at temperature 1 on "
          f"{args.max_prompts} held-out prompts; KL to the SFT policy" +
          (f"; sft-best-of-{n}: the SFT policy's best of {n} answers by the reward model, its KL the analytic bound "
           "log N - (N-1)/N" if n else ""))
    runs.print_table(summarise(per_seed, args.start_seed))
    runs.write_json(root / "learning.json", {"task": args.task, "args": vars(args), "per_seed": per_seed})
    print(f"\nall numbers: {root / 'learning.json'}")
    return per_seed


def make_parser():
    """This script's parser, for tests and tools that read its options."""
    from transformers import HfArgumentParser

    return HfArgumentParser(LearningArguments)


if __name__ == "__main__":
    main(make_parser().parse_args_into_dataclasses()[0])
