"""ppo.py under its launchers: two processes with torchrun, accelerate + DeepSpeed ZeRO-2 and ZeRO-3 on CPU, and
SIGTERM (a file of its own, so that pytest-xdist runs it beside test_ppo.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, accelerate_script, run
from test_ppo import SHORT, metrics, ppo_run

from simple_rlhf import runs

SPY_ROLLOUTS = """
import os, sys, torch
import ppo
from simple_rlhf import arguments, data, rollout
generate = rollout.generate_rollout
def spy(*args, **kwargs):
    sample = generate(*args, **kwargs)
    torch.save(sample.responses, os.path.join(sys.argv[1], f"responses-{os.environ['RANK']}.pt"))
    return sample
rollout.generate_rollout = spy
ppo.main(*arguments.parse_args((data.DataArguments, ppo.PPOArguments, ppo.ModelConfig), sys.argv[2:]))
"""


def test_sigterm_finishes_the_step_writes_a_resumable_checkpoint_and_exits_0(env, demo_models, tmp_path):
    out = tmp_path / "ppo"
    process = subprocess.Popen([str(a) for a in ppo_run(demo_models, out, "--max_steps", "1000",
                                                         "--save_steps", "1000")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    newest = runs.newest_complete_checkpoint(out)
    assert newest is not None and "resume with --resume_from_checkpoint" in stdout
    step = int(newest.split("-")[-1])
    assert step == len(metrics(out)) >= 1
    run(ppo_run(demo_models, out, "--max_steps", str(step + 1), "--resume_from_checkpoint", "true"), env)
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 2))
    assert (out / "adapter_model.safetensors").exists()


def test_two_processes_with_torchrun_gather_metrics(env, demo_models, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               *ppo_run(demo_models, out, "--max_steps", "2")[1:]]
    run(command, env)
    history = metrics(out)
    assert [m["step"] for m in history] == [1, 2]
    assert history[-1]["episode"] == 2 * 4 * 2  # steps * prompts per process * processes
    assert (out / "adapter_model.safetensors").exists() and (out / "critic" / "adapter_config.json").exists()


@pytest.mark.slow
def test_deepspeed_zero2_cpu_offload_runs_two_iterations(env, demo_models, tmp_path):
    out = tmp_path / "ds"
    result = run(accelerate_script(*ppo_run(demo_models, out, "--max_steps", "2", "--save_steps", "2")[1:]), env)
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert runs.checkpoint_is_complete(out / "checkpoint-2")
    assert (out / "adapter_model.safetensors").exists()
    # Really DeepSpeed (use_cpu once turned the launch into plain MULTI_CPU without a word).
    assert "running as DEEPSPEED" in result.stderr and (out / "checkpoint-2" / "deepspeed").is_dir()


ZERO3_CPU = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                                   # 0: shard even the tiny model's small tensors, as a real model's would be
                                   "stage3_param_persistence_threshold": 0},
             "bf16": {"enabled": True}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}


def zero3_launch(tmp_path):
    """An accelerate config for one process of ZeRO-3 on CPU, every tensor sharded (ZERO3_CPU)."""
    (tmp_path / "ds3.json").write_text(json.dumps(ZERO3_CPU))
    (tmp_path / "zero3.yaml").write_text(
        "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: " + str(tmp_path / "ds3.json") +
        "\n  zero3_init_flag: true\nnum_machines: 1\nnum_processes: 1\nmachine_rank: 0\nuse_cpu: false\n")
    return tmp_path / "zero3.yaml"


@pytest.mark.slow
def test_deepspeed_zero3_cpu_offload_one_process_gathers_for_generation_and_saving(env, demo_models, tmp_path):
    """configs/zero3_offload.yaml's setup in one process on CPU: parameters sharded, gathered for generate() and to
    save adapters and checkpoints (without that, every saved tensor is an empty shard)."""
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "ds3"
    result = run(accelerate_script(*ppo_run(demo_models, out, *SHORT, "--save_steps", "2")[1:],
                                   config=zero3_launch(tmp_path)), env)
    assert "running as DEEPSPEED" in result.stderr and [m["step"] for m in metrics(out)] == [1, 2]
    saved = torch.load(out / "checkpoint-2" / "trainable_params.pt")
    assert all(t.numel() > 0 for t in saved.values()) and (out / "checkpoint-2" / "deepspeed").is_dir()
    actor = AutoPeftModelForCausalLM.from_pretrained(out)
    lora_b = [p for n, p in actor.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
@pytest.mark.parametrize("setup", [["--advantage_estimator", "rloo", "--num_generations", "2"],
                                   ["--use_peft", "false", "--learning_rate", "1e-5"]],
                         ids=["rloo-reward-model-alone", "full-fine-tuning-reference"])
def test_deepspeed_zero3_runs_with_the_frozen_models_outside_the_engine(env, demo_models, tmp_path, setup):
    """Under ZeRO-3 transformers builds every model partitioned: the reward model loaded on its own (rloo) and, in
    full fine-tuning, the reference had empty weights at their first forward ('weight' must be 2-D). They are now
    DeepSpeed inference engines; the reference starts equal to the actor, so the first KL is ~0."""
    out = tmp_path / "ds3"
    result = run(accelerate_script(*ppo_run(demo_models, out, *SHORT, *setup)[1:], config=zero3_launch(tmp_path)),
                 env)
    history = metrics(out)
    assert "running as DEEPSPEED" in result.stderr and [m["step"] for m in history] == [1, 2]
    assert all(math.isfinite(m["objective/scores"]) for m in history)
    assert abs(history[0]["objective/kl"]) < 0.05  # the reference's weights are the actor's, gathered
    assert "critic" not in os.listdir(out) if "rloo" in setup else True


def test_two_processes_sample_with_their_own_seeds(env, demo_models, tmp_path):
    """Every prompt the same: processes that sampled with the same seed would give the same answers."""
    data = tmp_path / "same.jsonl"
    row = {"prompt": "\n\nHuman: What color is the sky?\n\nAssistant:", "chosen": " Blue.", "rejected": " Red."}
    data.write_text((json.dumps(row) + "\n") * 40)
    (tmp_path / "spy.py").write_text(SPY_ROLLOUTS)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
               tmp_path / "spy.py", tmp_path, *ppo_run(demo_models, out, *SHORT, "--max_steps", "1", "--dataset_name",
                                                       data, "--data_split", "0,0,1")[2:]]
    run(command, env)
    first, second = (torch.load(tmp_path / f"responses-{rank}.pt") for rank in (0, 1))
    assert first.shape == second.shape == (4, 6) and not torch.equal(first, second)


@pytest.mark.slow
def test_full_fine_tuning_under_deepspeed_bf16_starts_with_kl_0(env, demo_models, tmp_path):
    """accelerate_config.yaml (ZeRO-2, bf16) casts actor and critic to bf16; the float32-loaded reference and reward
    model must follow, or the first step's KL (actor == reference) is not 0."""
    out = tmp_path / "ds"
    run(accelerate_script(*ppo_run(demo_models, out, *SHORT, "--max_steps", "1", "--use_peft", "false",
                                   "--learning_rate", "1e-5", "--save_steps", "100")[1:]), env)
    assert abs(metrics(out)[0]["objective/kl"]) < 1e-4


def test_grpo_with_two_processes_gathers_the_rewards_for_batch_statistics(env, demo_models, tmp_path):
    out = tmp_path / "ddp-grpo"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               *ppo_run(demo_models, out, *SHORT, "--advantage_estimator", "grpo", "--num_generations", "2",
                        "--scale_rewards", "batch", "--normalize_advantages", "true")[1:]]
    run(command, env)
    assert [m["step"] for m in metrics(out)] == [1, 2] and "loss/value_avg" not in metrics(out)[-1]
    assert (out / "adapter_model.safetensors").exists() and not (out / "critic").exists()
