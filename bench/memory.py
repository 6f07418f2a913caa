"""Will it fit? The peak GPU memory of a step, by role and kind, before it runs; and what to change when it doesn't.

    python bench/memory.py --config recipes/opt-1.3b/ppo.yaml
    python bench/memory.py --config recipes/opt-1.3b/sft.yaml --per_device_train_batch_size 16 --gpu_memory_gb 24
    python bench/memory.py --config recipes/opt-1.3b/reward.yaml --gradient_checkpointing false \
        --accelerate_config none                      # plain `python reward.py ...`: no DeepSpeed
    python bench/memory.py --config recipes/opt-1.3b/dpo.yaml   # dpo.py: the one-step alternative to steps 2 and 3
    python bench/memory.py --validate                 # the arithmetic against torch's allocations on this CPU

The step (sft, reward, ppo, dpo) is the config file's name, or --step. Every option of the step works as in the step
itself (same YAML, same overrides). Model sizes come from each model's config.json: a local folder, the hub cache,
or ../shared/model-configs for a hub id; a PPO or DPO recipe's step-1/step-2 outputs that do not exist yet are sized
from the sibling sft.yaml / reward.yaml of the recipe. The arithmetic is in memory_plan.py.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simple_rlhf import arguments, data, errors, memory, memory_plan, models, rollout, runs  # noqa: E402
from simple_rlhf.memory import GIB  # noqa: E402


@dataclass
class MemoryArguments:
    """Options of the planner itself (the step's own options come from its YAML and flags)."""

    step: str | None = field(default=None, metadata={"help": "sft, reward, ppo or dpo (default: the --config file's "
                             "name)."})
    gpu_memory_gb: float = field(default=24.0, metadata={"help": "The GPU's memory in GiB (nvidia-smi's total)."})
    accelerate_config: str = field(default="accelerate_config.yaml", metadata={
        "help": "The accelerate config the step is launched with (DeepSpeed stage, offload, processes); 'none' for "
        "plain python."})
    validate: bool = field(default=False, metadata={"help": "Compare the arithmetic with torch's measured "
                           "allocations for small models on this CPU (bench/memory_validate.py) and exit."})


PLANNED_STEPS = (*data.STEPS, "dpo")


def step_arguments(step: str):
    if step == "dpo":
        import dpo

        return dpo.ARGUMENTS
    if step == "sft":
        import sft

        return sft.ARGUMENTS
    if step == "reward":
        import reward

        return reward.ARGUMENTS
    import ppo

    return (data.DataArguments, ppo.PPOArguments, ppo.ModelConfig)


def guess_step(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--step" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--step="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
    return None


def sibling_model(config_path: str | None, step: str) -> str | None:
    """The model_name_or_path of recipes/X/<step>.yaml beside a ppo.yaml: what its step-1/2 outputs will be."""
    if not config_path:
        return None
    import yaml

    sibling = Path(config_path).with_name(f"{step}.yaml")
    if not sibling.exists():
        return None
    return (yaml.safe_load(sibling.read_text()) or {}).get("model_name_or_path")


def fill_ppo_models(args, argv, fields=(("sft_model_path", "sft"), ("reward_model_path", "reward"))) -> list[str]:
    """PPO's sft/reward paths (DPO's model_name_or_path) that don't exist yet (a recipe before steps 1-2): size them
    from the recipe."""
    notes = []
    config_path = argv[argv.index("--config") + 1] if "--config" in argv else None
    for attr, step in fields:
        path = getattr(args, attr)
        if path and not Path(path).exists() and path.startswith(("out/", "./", "/")):
            stand_in = sibling_model(config_path, step)
            if stand_in:
                notes.append(f"--{attr} {path} does not exist yet: sized as {stand_in} (recipes' {step}.yaml)")
                setattr(args, attr, stand_in)
    return notes


def same_tokenizer(args) -> bool:
    """Whether the PPO reward model reads the actor's tokens (else the critic starts from the SFT model): compared
    when both are local folders, assumed otherwise."""
    paths = [args.sft_model_path, args.reward_model_path]
    if not all(path and Path(path).is_dir() for path in paths):
        return True
    return rollout.same_tokenizer(*(models.load_tokenizer(path) for path in paths))


def print_plan(plan, gpu_bytes: float) -> None:
    rows = [["role", "kind", "GPU GiB", "CPU GiB", "note"]]
    for line in plan.lines:
        rows.append([line.role, line.kind, f"{line.gpu / GIB:.2f}", f"{line.cpu / GIB:.2f}" if line.cpu else "",
                     line.note])
    rows.append(["total", "tensors at the peak", f"{plan.allocated / GIB:.2f}", "", ""])
    rows.append(["margin", f"CUDA context {memory.CUDA_CONTEXT_GIB} GiB + allocator "
                 f"{memory.FRAGMENTATION:.0%}", f"{plan.margin / GIB:.2f}", "", ""])
    rows.append(["peak", "predicted", f"{plan.total / GIB:.2f}", "", ""])
    runs.print_table(rows)
    peak = max(plan.phases, key=plan.phases.get)
    print(f"\ntransient memory of each phase (one phase at a time; {peak} is the peak, in the total above):")
    rows = [["phase", "role", "what", "GiB"]]
    rows += [[phase, role, what, f"{b / GIB:.2f}"] for phase, role, what, b in plan.details]
    runs.print_table(rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--validate" in argv:
        import memory_validate

        return memory_validate.main()
    step = guess_step(argv)
    if step not in PLANNED_STEPS:
        raise SystemExit(f"error: cannot tell the step from {step!r}; give --config recipes/X/(sft|reward|ppo|dpo).yaml"
                         " or --step sft|reward|ppo|dpo")
    # The recipe's model folders need not exist yet: the plan is made before step 1 has run.
    parsed = errors.exit_on_user_error(arguments.validate_args)((MemoryArguments, *step_arguments(step)), argv,
                                                             check_paths=False)
    options, args, model_args = parsed[0], parsed[-2], parsed[-1]
    try:
        launch = memory.launch_from_file(options.accelerate_config)
        notes = fill_ppo_models(args, argv) if step == "ppo" else \
            fill_ppo_models(model_args, argv, (("model_name_or_path", "sft"),)) if step == "dpo" else []
        setup = memory_plan.setup_from_args(step, args, model_args, launch,
                                            same_tokenizer(args) if step == "ppo" else True)
        plan = memory_plan.make_plan(setup)
    except (memory.PlanError, errors.UserError) as error:
        raise SystemExit(f"error: {error}")
    gpu = options.gpu_memory_gb * GIB
    for note in notes:
        print(f"note: {note}")
    print(f"{step}: {launch.describe()}")
    print_plan(plan, gpu)
    if plan.fits(gpu):
        print(f"fits {options.gpu_memory_gb:g} GiB: {plan.total / GIB:.1f} GiB predicted, "
              f"{(gpu - plan.total) / GIB:.1f} GiB to spare")
        return
    print(f"does NOT fit {options.gpu_memory_gb:g} GiB: {plan.total / GIB:.1f} GiB predicted")
    options_found = memory_plan.fitting_knobs(setup, gpu)
    if not options_found:
        print("nothing here makes it fit: use a smaller model, shorter sequences, or more GPUs (ZeRO-3)")
    for flags, fixed in options_found:
        print(f"  fits with {' + '.join(flags)}: {fixed.total / GIB:.1f} GiB")
    sys.exit(1)


if __name__ == "__main__":
    main()
