"""Shared fixtures: an offline environment, a cache for the built-in demo model, and a way to run the scripts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# The test models are tiny: one thread per process is fastest, and keeps parallel processes from thrashing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Fixtures that train the demo models (a minute or more): every test that uses one is in the slow tier, so that the
# quick tier (-m "not slow") keeps to unit tests, validation and short runs (about 2 minutes on 2 cores).
TRAINING_FIXTURES = {"demo_models", "demo_run", "sft_full", "reward_from_sft", "demo_sft", "demo_dpo",
                     "quick_demo_models"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end training runs (CI runs them too; -m 'not slow' skips them)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def script_env(tmp_path_factory):
    """Environment for subprocesses: offline, quiet, the demo model cached once per session."""
    env = dict(os.environ)
    env.update(
        SIMPLE_RLHF_CACHE=os.environ.get("SIMPLE_RLHF_CACHE", str(tmp_path_factory.mktemp("cache"))),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
    )
    os.environ["SIMPLE_RLHF_CACHE"] = env["SIMPLE_RLHF_CACHE"]  # in-process calls share the cache
    return env


def run(args, env, check=True, timeout=600):
    """Run a command from the project root; on an unexpected exit code, fail with the end of its output."""
    result = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-5000:]}")
    return result


def python_script(*args):
    return [sys.executable, *args]


def accelerate_script(*args, config="accelerate_config.yaml"):
    # Port 0: accelerate picks a free port, so launches in parallel test workers (pytest -n) never collide.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port", "0",
            *args]


@pytest.fixture(scope="session")
def hh_data():
    path = SHARED / "data" / "hh-rlhf-static"
    if not (path / "train.jsonl").exists():
        pytest.skip("../shared/data/hh-rlhf-static is absent")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    path = SHARED / "tokenizers" / "gpt2"
    if not (path / "vocab.json").exists():
        pytest.skip("../shared/tokenizers/gpt2 is absent")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def env(script_env):
    # One thread per process: on a small shared machine, torch's default threads make tiny models ~20x slower.
    return {**script_env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def demo_models(env, tmp_path_factory):
    """The demo chain's steps 1 and 2 (full fine-tuning), as the README runs them: built once per test session and
    shared by the pytest-xdist workers (the first builds them under a file lock, the others wait and reuse them).
    While working on a step, SIMPLE_RLHF_DEMO_MODELS=SFT_DIR,REWARD_DIR reuses models built earlier by those two
    commands."""
    from filelock import FileLock

    if os.environ.get("SIMPLE_RLHF_DEMO_MODELS"):
        return tuple(os.environ["SIMPLE_RLHF_DEMO_MODELS"].split(","))
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo-models"
    sft, reward = root / "sft", root / "reward"
    with FileLock(f"{root}.lock"):
        if not (root / "complete").exists():  # built in place (the reward model records the SFT folder it started from)
            shutil.rmtree(root, ignore_errors=True)
            run(python_script("sft.py", "--config", "recipes/demo/sft.yaml", "--output_dir", sft), env)
            run(python_script("reward.py", "--config", "recipes/demo/reward.yaml", "--output_dir", reward,
                              "--model_name_or_path", sft), env)
            (root / "complete").touch()
    return str(sft), str(reward)


@pytest.fixture(scope="session")
def reward_like_model(tmp_path_factory, script_env):
    """A one-label sequence classifier on the demo model: what reward.py writes (untrained)."""
    from transformers import AutoModelForSequenceClassification

    from simple_rlhf import models

    path = tmp_path_factory.mktemp("classifier")
    builtin = models.resolve_model_path(models.BUILTIN_MODEL)
    AutoModelForSequenceClassification.from_pretrained(builtin, num_labels=1).save_pretrained(path)
    models.load_tokenizer(builtin).save_pretrained(path)
    return path
