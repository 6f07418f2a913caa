"""All the steps in one command: SFT -> reward model -> PPO (or SFT -> DPO), each an `accelerate launch` subprocess.

    python train.py --preset demo                          # offline, CPU, a few minutes -> out/demo/{sft,reward,ppo}
    python train.py --preset demo --method dpo             # SFT -> DPO -> out/demo/{sft,dpo}
    python train.py --preset opt-1.3b                      # the 24 GB GPU recipe (reward model OPT-350m)
    python train.py --preset opt-1.3b --reward_model facebook/opt-1.3b
    python train.py --preset demo --steps 3 --ppo_args "--max_steps 80 --kl_coef 0.1"

Each step runs `accelerate launch --config_file ACCELERATE_CONFIG <step>.py --config recipes/PRESET/<step>.yaml`
with its output folder OUTPUT_DIR/<step> and the previous steps' outputs wired in; the per-step extra arguments come
last, so they override anything. A step that finished writes OUTPUT_DIR/<step>/step_complete.json (its metrics,
duration and options) and is skipped on re-run, unless --force or its options changed (then it and the chosen steps
after it run again); a step that was interrupted resumes from its newest complete checkpoint. A finished step that
runs again is built beside the old one, in OUTPUT_DIR/<step>.new, and swapped in only once it finished: a mistake
never costs the finished outputs. Every chosen step's arguments are validated before the first step starts. The
steps run from the folder train.py was started in, so that relative paths in --ppo_args etc. are the user's. Logs:
OUTPUT_DIR/logs/<step>.log, also streamed here with the step's name. Charts: OUTPUT_DIR/plots/. At the end a summary
table, also in OUTPUT_DIR/summary.json.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from simple_rlhf import arguments, data, errors, plots, runs

ROOT = Path(__file__).resolve().parent
# The steps of each method, by number: SFT -> reward model -> PPO, or SFT -> DPO.
METHODS = {"ppo": {1: "sft", 2: "reward", 3: "ppo"}, "dpo": {1: "sft", 2: "dpo"}}
SCRIPTS = {"sft": "sft.py", "reward": "reward.py", "ppo": "ppo.py", "dpo": "dpo.py"}
DONE_FILE = "step_complete.json"
TAIL_LINES = 20


@dataclass
class TrainArguments:
    preset: str = field(default="demo", metadata={
        "help": "Which recipes to run: recipes/PRESET/{sft,reward,ppo}.yaml. `demo` (offline tiny model, CPU) or "
                "`opt-1.3b` (OPT-1.3b on one 24 GB GPU)."})
    method: str = field(default="ppo", metadata={
        "help": "ppo: SFT -> reward model -> PPO (steps 1 2 3); dpo: SFT -> DPO (steps 1 2), recipes/PRESET/dpo.yaml."})
    steps: list[int] | None = field(default=None, metadata={
        "help": "The steps to run (default: all of the method's), e.g. `--steps 2 3`; a later step uses the earlier "
                "steps' outputs in OUTPUT_DIR."})
    output_dir: str | None = field(default=None, metadata={
        "help": "The root folder (default out/PRESET): each step writes OUTPUT_DIR/sft, /reward, /ppo; logs, plots and "
                "summary.json go next to them."})
    accelerate_config: str = field(default="accelerate_config.yaml", metadata={
        "help": "The accelerate config each step is launched with; `none` runs each step as plain `python`."})
    reward_model: str | None = field(default=None, metadata={
        "help": "The reward model's starting point: `sft` (the step-1 output), `recipe` (the recipe's model, "
                "facebook/opt-350m for opt-1.3b), or a hub id / folder (e.g. facebook/opt-1.3b, trained with LoRA). "
                "Default: sft for demo, recipe for opt-1.3b."})
    sft_args: str = field(default="", metadata={"help": "Extra arguments for sft.py, e.g. \"--lora_r 16\"."})
    reward_args: str = field(default="", metadata={"help": "Extra arguments for reward.py."})
    ppo_args: str = field(default="", metadata={"help": "Extra arguments for ppo.py, e.g. \"--max_steps 80\"."})
    dpo_args: str = field(default="", metadata={"help": "Extra arguments for dpo.py (--method dpo), e.g. \"--beta "
                                                  "0.2\"."})
    force: bool = field(default=False, metadata={
        "help": "Re-run the chosen steps from scratch even if they finished; each is built in OUTPUT_DIR/<step>.new "
                "and replaces the old folder only once it finished."})


# ----------------------------------------------------------------------------------------------------------------
# Checks and wiring
# ----------------------------------------------------------------------------------------------------------------
def validate(args: TrainArguments) -> dict[str, list[str]]:
    """Everything checkable before a step starts; returns the per-step extra arguments, split."""
    recipes = ROOT / "recipes" / args.preset
    if not recipes.is_dir():
        known = ", ".join(sorted(p.name for p in (ROOT / "recipes").iterdir() if p.is_dir()))
        raise errors.UserError(f"--preset {args.preset}: no folder recipes/{args.preset}; use one of {known}")
    if args.method not in METHODS:
        raise errors.UserError(f"--method {args.method}: use ppo (SFT -> reward model -> PPO) or dpo (SFT -> DPO)")
    step_names = METHODS[args.method]
    args.steps = list(step_names) if args.steps is None else args.steps
    bad = [s for s in args.steps if s not in step_names]
    if bad or not args.steps:
        named = ", ".join(f"{n} ({name})" for n, name in step_names.items())
        raise errors.UserError(f"--steps {' '.join(map(str, args.steps))}: give some of {named} (--method "
                               f"{args.method})")
    if not (recipes / f"{step_names[max(step_names)]}.yaml").is_file():
        raise errors.UserError(f"--method {args.method}: recipes/{args.preset} has no "
                               f"{step_names[max(step_names)]}.yaml")
    if args.accelerate_config != "none" and not Path(args.accelerate_config).is_file() and \
            (ROOT / args.accelerate_config).is_file():
        args.accelerate_config = str(ROOT / args.accelerate_config)  # the default, run from another folder
    if args.accelerate_config != "none" and not Path(args.accelerate_config).is_file():
        raise errors.UserError(f"--accelerate_config {args.accelerate_config}: no such file; give an accelerate "
                               "config (e.g. accelerate_config.yaml, configs/ddp.yaml) or `none` for plain python")
    extra = {}
    for name in step_names.values():
        try:
            extra[name] = shlex.split(getattr(args, f"{name}_args"))
        except ValueError as error:
            raise errors.UserError(f"--{name}_args {getattr(args, f'{name}_args')!r}: {error}; quote it as one "
                                   "shell string, e.g. --sft_args \"--lora_r 16\"")
    return extra


def final_output(folder: Path) -> Path | None:
    """Where a finished step's model is: the merged model when there is one (the next steps load it faster)."""
    for candidate in (folder / "merged", folder):
        if (candidate / "config.json").exists() or (candidate / "adapter_config.json").exists():
            return candidate
    return None


def reward_choice(args: TrainArguments) -> str:
    return args.reward_model or ("sft" if args.preset == "demo" else "recipe")


def step_inputs(args: TrainArguments, name: str, extra: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(earlier step, flag) pairs: which outputs a step takes, and through which flag. A flag the user sets in the
    step's extra arguments is theirs to fill."""
    wanted = {"sft": [], "reward": [("sft", "--model_name_or_path")] if reward_choice(args) == "sft" else [],
              "ppo": [("sft", "--sft_model_path"), ("reward", "--reward_model_path")],
              "dpo": [("sft", "--model_name_or_path")]}[name]
    return [(step, flag) for step, flag in wanted if flag not in extra[name]]


def check_inputs(args: TrainArguments, root: Path, extra: dict[str, list[str]]) -> None:
    """Before anything runs: every input that no chosen step will produce must already be in OUTPUT_DIR."""
    step_names = METHODS[args.method]
    chosen = {step_names[number] for number in args.steps}
    for name in chosen:
        for step, flag in step_inputs(args, name, extra):
            if step not in chosen and final_output(root / step) is None:
                raise errors.UserError(f"{root / step} holds no finished {step} step, which step {name} needs; add "
                                       f"{list(step_names.values()).index(step) + 1} to --steps, or pass "
                                       f"`{flag} PATH` in --{name}_args")


def step_command(args: TrainArguments, name: str, root: Path, extra: dict[str, list[str]], resume: bool,
                 output_dir: Path | None = None, overwrite: bool = False) -> list[str]:
    """The launch command of one step: launcher, script, recipe, output folder (default OUTPUT_DIR/<step>), wiring,
    resume or overwrite, the user's extras."""
    if args.accelerate_config == "none":
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(Path(args.accelerate_config).resolve())]
        if fp32_on_this_cpu(args, extra[name]):
            launcher += ["--mixed_precision", "no"]
    command = launcher + [str(ROOT / SCRIPTS[name]), "--config", str(ROOT / "recipes" / args.preset / f"{name}.yaml"),
                          "--output_dir", str(output_dir or root / name)]
    for step, flag in step_inputs(args, name, extra):
        command += [flag, str(final_output(root / step))]  # steps move their final model in last: it is complete
    if name == "reward" and reward_choice(args) not in ("sft", "recipe"):
        # The recipes' full fine-tuning is sized for their own reward model; a larger one trains with LoRA.
        command += ["--model_name_or_path", reward_choice(args)] + ([] if args.preset == "demo" else
                                                                     ["--use_peft", "true"])
    if resume:
        command += ["--resume_from_checkpoint", "true"]
    if overwrite:
        command += ["--overwrite_output_dir", "true"]
    return command + extra[name]


def fp32_on_this_cpu(args: TrainArguments, step_args: list[str]) -> bool:
    """Whether to launch a step with accelerate's `--mixed_precision no`: without a GPU, on a CPU without native bf16
    (AVX2), the configs' bf16 is emulated and a step ~10x slower. Not with `--accelerate_config none` (the recipe
    decides) or when the step's arguments set --bf16."""
    import torch

    if args.accelerate_config == "none" or any(arg.startswith("--bf16") for arg in step_args):
        return False
    return not torch.cuda.is_available() and not arguments.cpu_has_fast_bf16()


def step_arguments(name: str) -> tuple:
    """The argument dataclasses of a step's script (imported here only to validate, not to run)."""
    if name == "ppo":
        from trl import ModelConfig

        from ppo import PPOArguments

        return (data.DataArguments, PPOArguments, ModelConfig)
    return importlib.import_module(name).ARGUMENTS


def validate_steps(args: TrainArguments, root: Path, extra: dict[str, list[str]]) -> dict[str, dict]:
    """Before any step runs: every chosen step's full arguments (recipe, wiring, extras) pass the steps' validation
    layer, so that a typo in --ppo_args fails now, not after hours of SFT, and the models and data they name exist
    (relative to the folder train.py was started from, where the steps run), except the earlier steps' outputs,
    which are not made yet. Returns each chosen step's settings (see step_settings)."""
    settings = {}
    for number in sorted(set(args.steps)):
        name = METHODS[args.method][number]
        command = step_command(args, name, root, extra, resume=False)
        argv = command[command.index(str(ROOT / SCRIPTS[name])) + 1:]
        wired = [flag for _, flag in step_inputs(args, name, extra)]
        try:
            parsed = arguments.validate_args(step_arguments(name), argv, check_paths=False)
            for part in parsed:
                arguments.check_locations(part, skip=wired)
        except errors.UserError as error:
            raise errors.UserError(f"step {number} ({name}): {error}")
        settings[name] = step_settings(argv, parsed, wired)
    return settings


# Not settings of what a step computes: where it writes, whether it resumes or replaces.
NOT_SETTINGS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")


def step_settings(argv: list[str], parsed: tuple, wired: list[str]) -> dict:
    """What a step was run with, recorded in its step_complete.json: `values`, every parsed option (recipe and
    extras applied), and `given`, the options that the recipe or the command line set. Options set by neither take
    their defaults, which may depend on the machine (use_cpu, bf16 on a CPU): they are not compared. The earlier
    steps' outputs (wired) are not compared either: a step re-run makes the later ones run again anyway."""
    import dataclasses

    import yaml

    skip = set(NOT_SETTINGS) | {flag[2:] for flag in wired}
    values = {field.name: json.loads(json.dumps(getattr(part, field.name), default=str))
              for part in parsed for field in dataclasses.fields(part) if field.name not in skip}
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if "--config" in argv:
        given |= set(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {})
    return {"given": sorted(given & set(values)), "values": values}


def changed_settings(done: dict, settings: dict) -> list[str]:
    """`--name old -> new` for each option, set by the recipe or the command line then or now, whose value differs
    from the one the finished step recorded. A marker without settings (written before they were recorded) matches."""
    old = done.get("settings")
    if not old:
        return []

    def show(value) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted(set(old["given"]) | set(settings["given"]))
    return [f"--{key} {show(old['values'].get(key))} -> {show(settings['values'].get(key))}" for key in keys
            if old["values"].get(key) != settings["values"].get(key)]


# ----------------------------------------------------------------------------------------------------------------
# Running a step
# ----------------------------------------------------------------------------------------------------------------
def run_step(name: str, command: list[str], log_path: Path) -> tuple[int, list[str]]:
    """Run one step, its output appended to its log and streamed as `[name] line`; return (exit code, last lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines arrive as they are printed, not at exit
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars become one line per update here: keep them few
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", bufsize=1)
        terminated = []

        def forward(signum, frame):  # `kill PID` of train.py: pass it on, so the step can checkpoint and stop
            terminated.append(signum)
            process.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            for line in process.stdout:  # text mode turns tqdm's \r redraws into lines too
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
                print(f"[{name}] {line}", end="", flush=True)
            code = process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the step too (same process group): let it checkpoint and stop
            process.wait()
            terminated.append(signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if terminated:
            print(f"\ninterrupted during step {name}; run the same command again to resume it", file=sys.stderr)
            sys.exit(128 + terminated[0])
        return code, list(tail)


def step_metrics(name: str, folder: Path) -> dict:
    """The headline numbers of a finished step, read from what it wrote."""
    if name in ("sft", "reward", "dpo"):
        results = folder / "eval_results.json"
        data = json.loads(results.read_text()) if results.exists() else {}
        keys = {"sft": ["eval_perplexity", "eval_loss"], "reward": ["eval_accuracy", "eval_margin"],
                "dpo": ["eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"]}[name]
        return {k: data[k] for k in keys if k in data}
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "metrics.jsonl").exists() else []
    if not rows:
        return {}
    return {"steps": rows[-1]["step"], "score_start": rows[0]["objective/scores"],
            "score_end": rows[-1]["objective/scores"], "kl_end": rows[-1]["objective/kl"]}


def headline(name: str, metrics: dict) -> str:
    if not metrics:
        return "-"
    if name == "sft":
        return f"eval perplexity {metrics['eval_perplexity']:.3f}"
    if name == "reward":
        return f"eval accuracy {metrics['eval_accuracy']:.3f}, margin {metrics.get('eval_margin', float('nan')):.3f}"
    if name == "dpo":
        return (f"eval reward accuracy {metrics['eval_rewards/accuracies']:.3f}, margin "
                f"{metrics.get('eval_rewards/margins', float('nan')):.3f}")
    return f"score {metrics['score_start']:.3f} -> {metrics['score_end']:.3f}, KL {metrics['kl_end']:.3f}"


def collect_plot(name: str, folder: Path, plots_dir: Path) -> str | None:
    """Draw the step's chart (again: cheap, and the step script may not have) and copy it to OUTPUT_DIR/plots."""
    try:
        path = plots.plot_step(name, folder)
    except Exception as error:  # a chart must not cost a finished training run
        print(f"warning: could not plot step {name}: {errors.describe(error)}", file=sys.stderr)
        return None
    if path is None:
        return None
    plots_dir.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(path, plots_dir / path.name))


def print_summary(rows: list[dict]) -> None:
    print()
    runs.print_table([("step", "status", "time", "headline", "output")] +
                       [(r["step"], r["status"], f"{r['duration_s']:.0f}s", headline(r["step"], r["metrics"]),
                         r["output"]) for r in rows])


def is_finished(folder: Path) -> bool:
    return (folder / DONE_FILE).exists()


def later_finished_steps(root: Path, number: int, chosen: list[int], method: str) -> list[str]:
    """Finished steps after step `number` that this run does not redo: they were trained on its previous output."""
    return [step for later, step in METHODS[method].items()
            if later > number and later not in chosen and is_finished(root / step)]


ARGUMENTS = (TrainArguments,)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


@errors.exit_on_user_error
def main(args: TrainArguments) -> list[dict]:
    extra = validate(args)
    # The steps run from the user's folder, where their relative paths (in --ppo_args, ...) were written.
    root = Path(args.output_dir or f"out/{args.preset}").resolve()
    arguments.check_output_writable(root, "--output_dir")
    check_inputs(args, root, extra)
    runs.lock_output_dir(root)  # a second train.py into the same folder would delete this one's <step>.new
    settings = validate_steps(args, root, extra)
    step_names = METHODS[args.method]
    fp32 = [step_names[n] for n in sorted(set(args.steps)) if fp32_on_this_cpu(args, extra[step_names[n]])]
    if fp32:
        print(f"no GPU, and this CPU has no native bf16: {', '.join(fp32)} run in fp32 (accelerate --mixed_precision "
              "no); add --bf16 true to a step's arguments to keep bf16", flush=True)
    summary, rerun_from = [], None
    for number in sorted(set(args.steps)):
        name = step_names[number]
        folder = root / name
        runs.finish_interrupted_swap(folder, ready=is_finished)
        done_file = folder / DONE_FILE
        changed = changed_settings(json.loads(done_file.read_text()), settings[name]) if done_file.exists() else []
        again = args.force or rerun_from is not None or bool(changed)
        if done_file.exists() and rerun_from is not None:
            # Its inputs were just made again: what it finished before was trained on the old ones.
            print(f"[{name}] running again from scratch: step {rerun_from} before it was re-run", flush=True)
        elif changed and not args.force:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            print(f"[{name}] running again: its arguments changed since it finished ({shown})", flush=True)
        if done_file.exists() and not again:
            done = json.loads(done_file.read_text())
            print(f"[{name}] skipped: finished before ({done_file}); --force runs it again", flush=True)
            done.pop("settings", None)  # in the step's marker; the summary stays readable
            summary.append({**done, "status": "skipped", "plot": collect_plot(name, folder, root / "plots")})
            continue
        # Run again, the step is built beside the old folder and swapped in once it finished. An earlier attempt
        # there is resumed when it has a checkpoint, unless an earlier step was just re-made (then it is stale).
        target = root / f"{name}.new" if again and folder.exists() else folder
        if target != folder and (rerun_from is not None or runs.newest_complete_checkpoint(target) is None):
            shutil.rmtree(target, ignore_errors=True)
        checkpoint = runs.newest_complete_checkpoint(target)
        # Outputs of an attempt killed before its first checkpoint: replaced (deleted once this run finished).
        leftovers = checkpoint is None and bool(runs.run_contents(target))
        command = step_command(args, name, root, extra, resume=checkpoint is not None, output_dir=target,
                               overwrite=leftovers)
        if checkpoint:
            print(f"[{name}] resuming the interrupted step from {checkpoint}", flush=True)
        print(f"[{name}] step {number}: {shlex.join(command)}", flush=True)
        started = time.time()
        code, tail = run_step(name, command, root / "logs" / f"{name}.log")
        duration = time.time() - started
        if code == 0 and final_output(target) is None:
            code = 1  # e.g. ppo.py stopped on a signal after a checkpoint: it exits 0 but did not finish
            tail.append(f"(step {name} exited 0 without writing its final model to {target})")
        if code != 0:
            if target != folder and runs.newest_complete_checkpoint(target) is None:
                shutil.rmtree(target, ignore_errors=True)  # nothing to resume: leave only the untouched old folder
            print(f"\nerror: step {number} ({name}) failed with exit code {code}; the last {len(tail)} lines of "
                  f"{root / 'logs' / f'{name}.log'}:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in tail), file=sys.stderr, flush=True)
            sys.exit(code)
        record = {"step": name, "duration_s": round(duration, 1), "metrics": step_metrics(name, target),
                  "output": str(folder / final_output(target).relative_to(target)), "command": command,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # written last: its presence means the step finished; its settings tell a later run whether to redo it
        runs.write_json(target / DONE_FILE, {**record, "settings": settings[name]})
        if target != folder:
            runs.swap_in(target, folder)
        summary.append({**record, "status": "ran", "plot": collect_plot(name, folder, root / "plots")})
        rerun_from = rerun_from or name
        for stale in later_finished_steps(root, number, args.steps, args.method):
            print(f"[{name}] note: {stale} was trained on the previous {name} output; add its step to --steps to "
                  "train it again", flush=True)

    print_summary(summary)
    runs.write_json(root / "summary.json", {"preset": args.preset, "method": args.method, "output_dir": str(root),
                                            "steps": summary})
    print(f"\nsummary: {root / 'summary.json'}; charts: {root / 'plots'}; logs: {root / 'logs'}")
    return summary


if __name__ == "__main__":
    main(arguments.parse_args(ARGUMENTS)[0])
