"""simple_rlhf/memory.py, simple_rlhf/memory_plan.py and bench/memory.py: the arithmetic against counts and measured allocations, the CLI, the log line."""

import logging
import sys
from dataclasses import replace

import pytest

from simple_rlhf import arguments, memory, memory_plan, trainer_steps
import ppo
from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "bench"))
import memory as memory_cli  # noqa: E402  (bench/memory.py; `memory` is the package's arithmetic)
import memory_validate  # noqa: E402

GIB = memory.GIB


@pytest.fixture(scope="module")
def small_arch(script_env, tmp_path_factory):
    """A 4-layer OPT (hidden 256) config folder with the demo tokenizer."""
    return memory_validate.arch_folder(tmp_path_factory.mktemp("arch") / "small")


def test_lora_parameter_count_matches_peft(small_arch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small_arch))
    arch = memory.read_arch(str(small_arch))
    assert arch.params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "fc1"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_params(arch, ["q_proj", "v_proj", "fc1"], 8) == trainable


@pytest.mark.parametrize("case", [memory_validate.Case("reward"),
                                  memory_validate.Case("sft", use_peft=True, gradient_checkpointing=True)],
                         ids=["reward-full", "sft-lora-checkpointing"])
def test_prediction_within_15_percent_of_measured_allocation(small_arch, case):
    """The planner's peak of live tensors against torch's allocator, for the step's real trainer on a small model."""
    result = memory_validate.measure_trainer_step(case, small_arch)
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.15), result


def ppo_setup(small_arch, **changes):
    setup = memory_plan.Setup(step="ppo", models={"sft": str(small_arch), "reward": str(small_arch)},
                              launch=memory.Launch(), dtype="float32", use_peft=True, lora_r=8,
                              lora_targets=["q_proj", "v_proj"], micro_batch=4, max_prompt_length=64,
                              response_length=32, generation_batch=8)
    return replace(setup, **changes)


def weights_on_gpu(plan) -> float:
    return sum(line.gpu for line in plan.lines if line.kind.startswith("weights"))


def test_ppo_weights_are_shared_under_lora_and_copied_without(small_arch):
    arch = memory.read_arch(str(small_arch))
    reward = memory.read_arch(str(small_arch), True)
    shared = memory_plan.make_plan(ppo_setup(small_arch))
    separate = memory_plan.make_plan(ppo_setup(small_arch, use_peft=False))
    assert weights_on_gpu(shared) == (arch.params + reward.params) * 4  # actor = reference, critic = reward model
    assert weights_on_gpu(separate) == 2 * (arch.params + reward.params) * 4


def test_a_critic_free_estimator_plans_no_critic(small_arch):
    """--advantage_estimator rloo / grpo: no critic lines; without LoRA one copy of weights fewer, and less in all."""
    arch = memory.read_arch(str(small_arch))
    reward = memory.read_arch(str(small_arch), True)
    for use_peft in (True, False):
        with_critic = memory_plan.make_plan(ppo_setup(small_arch, use_peft=use_peft))
        without = memory_plan.make_plan(ppo_setup(small_arch, use_peft=use_peft, critic_free=True))
        assert any(line.role == "critic" for line in with_critic.lines)
        assert not any("critic" in line.role for line in without.lines) and without.total < with_critic.total
    assert weights_on_gpu(without) == (2 * arch.params + reward.params) * 4  # actor, reference, reward model
    args = ppo.PPOArguments(advantage_estimator="grpo", num_generations=2)
    assert memory_plan.setup_from_args("ppo", args, ppo.ModelConfig(), memory.Launch()).critic_free


def test_offload_moves_optimizer_states_off_the_gpu_and_checkpointing_cuts_activations(small_arch):
    zero2 = memory.Launch(zero_stage=2, bf16=True)
    on_gpu = memory_plan.make_plan(ppo_setup(small_arch, launch=zero2))
    offloaded = memory_plan.make_plan(ppo_setup(small_arch, launch=replace(zero2, offload_optimizer=True)))
    optimizer = lambda plan: [line for line in plan.lines if line.kind == "optimizer"]  # noqa: E731
    assert all(line.gpu > 0 and not line.cpu for line in optimizer(on_gpu))
    assert all(line.cpu > 0 and not line.gpu for line in optimizer(offloaded))
    full = memory_plan.make_plan(ppo_setup(small_arch, micro_batch=16, generation_batch=1))
    checkpointed = memory_plan.make_plan(ppo_setup(small_arch, micro_batch=16, generation_batch=1,
                                                   gradient_checkpointing=True))
    assert checkpointed.phases["train"] < 0.7 * full.phases["train"]


def test_knobs_that_make_it_fit_are_the_cheapest_first(small_arch):
    setup = ppo_setup(small_arch, micro_batch=32, generation_batch=32, max_prompt_length=256, response_length=256)
    plan = memory_plan.make_plan(setup)
    budget = plan.total * 0.8
    found = memory_plan.fitting_knobs(setup, budget)
    assert found and all(fixed.total <= budget for _, fixed in found)
    assert found[0][0][0].startswith("--generation_batch_size") or found[0][0][0].startswith(
        "--per_device_train_batch_size")


@pytest.mark.skipif(not (SHARED / "model-configs" / "opt-1.3b.json").exists(), reason="../shared is absent")
def test_cli_prints_the_recipe_table_and_knobs_when_it_does_not_fit(capsys, script_env):
    memory_cli.main(["--config", "recipes/opt-1.3b/ppo.yaml"])
    out = capsys.readouterr().out
    for role in ("actor", "reference", "critic", "reward model", "margin"):
        assert role in out
    assert "fits 24 GiB" in out and "sized as facebook/opt-1.3b" in out
    with pytest.raises(SystemExit) as exit_info:
        memory_cli.main(["--config", "recipes/opt-1.3b/sft.yaml", "--gpu_memory_gb", "4", "--load_in_4bit", "false"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "does NOT fit 4 GiB" in out and "fits with" in out


def test_trainer_steps_log_one_estimate_line(script_env, capfd, tmp_path):
    import sft

    data_args, training_args, model_args = arguments.parse_args(sft.ARGUMENTS, [
        "--config", "recipes/demo/sft.yaml", "--max_train_samples", "16", "--max_eval_samples", "8",
        "--output_dir", str(tmp_path / "sft")])
    capfd.readouterr()
    # setup_logging (inside) re-configures the root logger, so read the log from stderr rather than caplog.
    trainer_steps.prepare_trainer_step("sft", data_args, training_args, model_args)
    lines = [line for line in capfd.readouterr().err.splitlines() if "memory estimate" in line]
    assert len(lines) == 1 and "GiB peak per GPU" in lines[0]


def test_estimate_for_an_unknown_hub_id_is_one_line_and_never_raises(caplog, script_env):
    import sft

    _, training_args, model_args = arguments.parse_args(sft.ARGUMENTS, [
        "--config", "recipes/demo/sft.yaml", "--model_name_or_path", "nobody/no-such-model"])
    with caplog.at_level(logging.INFO, logger="simple_rlhf"):
        assert memory_plan.log_estimate("sft", training_args, model_args) is None
    assert "not available offline" in caplog.text


def test_recipe_smoke_overrides_only_sizes_and_counts():
    """bench/recipe_smoke.py runs the recipes as written: its overrides are lengths, batch sizes and step counts."""
    import recipe_smoke

    allowed = {"--max_length", "--per_device_train_batch_size", "--gradient_accumulation_steps", "--max_steps",
               "--per_device_eval_batch_size", "--max_eval_samples", "--max_prompt_length", "--response_length",
               "--num_mini_batches", "--generation_batch_size", "--total_episodes"}
    for step, args in recipe_smoke.SHRINK.items():
        flags = set(args[::2])
        assert flags <= allowed, (step, flags - allowed)
