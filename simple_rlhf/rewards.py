"""Reward functions beside the reward model: `--reward_funcs` loaded, checked, called TRL-style and weighed.

A reward function has TRL GRPOTrainer's signature, `fn(prompts, completions, **columns) -> list[float | None]`: the
prompts as the dataset holds them, the sampled answers as text, and the dataset's other columns by name (so a
`reference` or `answer` column makes a verifier). None means "not applicable to this sample": it adds nothing, as in
TRL. The sources of a PPO run are the reward model (first, when there is one) and the functions, each with a weight
(`--reward_weights`; 0 logs a source without optimising it: a ground truth watched beside the proxy it is not,
Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization").
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from simple_rlhf import synthetic
from simple_rlhf.errors import UserError, describe

MODEL_SOURCE = "model"  # the reward model's name among the sources (metrics: rewards/model)


def synthetic_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """builtin:synthetic, the built-in task's ground truth: 1 for a correct answer, plus 0.5 for a polite one
    (simple_rlhf.synthetic.check_synthetic_answer)."""
    checks = [synthetic.check_synthetic_answer(prompt, completion) for prompt, completion in zip(prompts, completions)]
    return [float(check["correct"]) + 0.5 * float(check["polite"]) for check in checks]


BUILTINS = {"synthetic": synthetic_reward}


@dataclass
class RewardFunction:
    """A loaded reward function: its name in metrics (rewards/NAME), the callable, and the columns it takes."""

    name: str
    spec: str  # as given to --reward_funcs
    function: Callable
    takes_all_columns: bool  # it has **kwargs
    named_columns: frozenset  # the keyword parameters it names besides prompts and completions


def load_reward_function(spec: str) -> RewardFunction:
    """`builtin:NAME`, `path/to/file.py:function` or `package.module:function`, checked before any model loads."""
    flag = f"--reward_funcs {spec}"
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"{flag}: write module:function, path/to/file.py:function or builtin:synthetic")
    if where == "builtin":
        if name not in BUILTINS:
            names = ", ".join(f"builtin:{b}" for b in BUILTINS)
            raise UserError(f"{flag}: no such built-in reward; the built-ins are {names}")
        function = BUILTINS[name]
    else:
        module = _load_module(where, flag)
        function = getattr(module, name, None)
        if function is None:
            found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
            raise UserError(f"{flag}: {where} has no function {name!r}" +
                            (f" (it has {', '.join(found[:8])})" if found else ""))
        if not callable(function):
            raise UserError(f"{flag}: {where}.{name} is a {type(function).__name__}, not a function")
    return _checked(function, spec, name)


def _load_module(where: str, flag: str):
    path = Path(where).expanduser()
    try:
        if where.endswith(".py"):
            if not path.is_file():
                raise UserError(f"{flag}: no such file {where}; give a .py file, relative to the current folder")
            module_name = f"reward_funcs_{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except UserError:
        raise
    except ModuleNotFoundError as error:
        raise UserError(f"{flag}: cannot import {where} ({describe(error)}); put it on PYTHONPATH or give the "
                        "path of its .py file")
    except Exception as error:  # the user's module raised while it was imported
        raise UserError(f"{flag}: importing {where} failed ({describe(error)})")


def _checked(function: Callable, spec: str, name: str) -> RewardFunction:
    """Its signature takes `prompts` and `completions` by those names, as TRL passes them; columns it requires by
    name are checked against the data once it is loaded (check_columns)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a callable without a readable signature: trust it
        return RewardFunction(name, spec, function, True, frozenset())
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not {"prompts", "completions"} <= named:
        raise UserError(f"--reward_funcs {spec}: {name}{inspect.signature(function)} must take prompts and "
                        f"completions by name, as TRL's reward functions do: def {name}(prompts, completions, "
                        "**columns) -> list[float]")
    return RewardFunction(name, spec, function, takes_all, frozenset(named - {"prompts", "completions"}))


def required_columns(reward: RewardFunction) -> set[str]:
    try:
        parameters = inspect.signature(reward.function).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in parameters.items() if p.default is p.empty and n not in ("prompts", "completions") and
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_columns(functions: list[RewardFunction], columns: list[str], dataset: str) -> None:
    """Every column a function requires by name is in the data (checked once the data is loaded)."""
    for reward in functions:
        missing = sorted(required_columns(reward) - set(columns))
        if missing:
            raise UserError(f"--reward_funcs {reward.spec}: it needs the column(s) {', '.join(missing)}, which "
                            f"{dataset} does not have (it has {', '.join(columns)})")


def source_names(has_model: bool, functions: list[RewardFunction]) -> list[str]:
    """The sources' names, unique: the reward model first, then each function (a repeated name gets -2, -3...)."""
    names = [MODEL_SOURCE] if has_model else []
    for reward in functions:
        name, count = reward.name, 2
        while name in names:
            name, count = f"{reward.name}-{count}", count + 1
        names.append(name)
    return names


def check_weights(weights: list[float] | None, names: list[str]) -> list[float]:
    """One weight per source (reward model first); default 1 each. At least one must be non-zero."""
    if not names:
        raise UserError("no reward: give --reward_model_path, --reward_funcs, or both")
    if weights is None:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise UserError(f"--reward_weights has {len(weights)} value(s) for {len(names)} reward source(s) "
                        f"({', '.join(names)}): give one weight per source, the reward model first")
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise UserError(f"--reward_weights {' '.join(map(str, weights))}: finite numbers, at least one not 0 (a "
                        "weight of 0 logs a source without optimising it)")
    return [float(w) for w in weights]


def call(reward: RewardFunction, prompts: list[str], completions: list[str], rows: list[dict]) -> torch.Tensor:
    """The function's rewards for these samples as a float tensor (None -> NaN: not applicable), checked: one number
    per completion, finite. A wrong answer is a UserError naming the function and the first bad position."""
    columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {})
               if key != "prompt" and (reward.takes_all_columns or key in reward.named_columns)}
    flag = f"--reward_funcs {reward.spec}"
    try:
        values = reward.function(prompts=prompts, completions=completions, **columns)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{flag}: it raised {describe(error)} on a batch of {len(completions)} completions")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"{flag}: it returned a {type(values).__name__}, not a list of numbers")
    if len(values) != len(completions):
        raise UserError(f"{flag}: it returned {len(values)} value(s) for {len(completions)} completions; return "
                        "one number (or None) per completion")
    out = []
    for position, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"{flag}: value {position} is {value!r} ({type(value).__name__}), not a number; return "
                            "floats (or None where the reward does not apply)")
        if not math.isfinite(value):
            raise UserError(f"{flag}: value {position} is {value} for the completion {completions[position][:80]!r}; "
                            "return finite numbers (None where the reward does not apply)")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)


def combine(per_source: dict[str, torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The reward each sample is trained on: the weighted sum of its sources. A function's None (NaN here) adds
    nothing (TRL's nansum); the reward model's NaN is a real one and stays, so the divergence guard stops the run."""
    total = torch.zeros_like(next(iter(per_source.values())))
    for (name, values), weight in zip(per_source.items(), weights):
        contribution = values * weight
        total = total + (contribution if name == MODEL_SOURCE else torch.nan_to_num(contribution, nan=0.0))
    return total


def completions_of(tokenizer, sample) -> list[str]:
    """The sampled answers as text: without padding and without the stop token that ended them (the EOS, or
    ppo.py's --stop_token), special tokens left out."""
    texts = []
    for response, mask, stopped in zip(sample.responses, sample.response_mask, sample.has_stop):
        ids = response[mask.bool()]
        texts.append(tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True))
    return texts


def score_sources(model_scores: torch.Tensor | None, functions: list[RewardFunction], names: list[str], tokenizer,
                  sample, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Each source's reward for each sample of a rollout ({name: (batch,) tensor}, NaN where a function returned
    None): the reward model's scores (given), then every function on the prompts as the dataset holds them and the
    decoded answers."""
    per_source = {} if model_scores is None else {names[0]: model_scores.float()}
    if functions:
        device = sample.responses.device
        prompts, completions = [row["prompt"] for row in rows], completions_of(tokenizer, sample)
        for name, reward in zip(names[len(per_source):], functions):
            per_source[name] = call(reward, prompts, completions, rows).to(device)
    return per_source


def source_means(per_source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{rewards/NAME: (sum, count)} of each source over the samples it applied to (the metrics average them over
    processes as sum / count); the reward model's NaN is kept, so that a broken reward model shows."""
    return {f"rewards/{name}": torch.stack([values.sum() if name == MODEL_SOURCE else torch.nansum(values),
                                            (~values.isnan()).sum().float() if name != MODEL_SOURCE
                                            else torch.tensor(float(len(values)), device=values.device)])
            for name, values in per_source.items()}
