"""PNG charts of each step's training curves, with matplotlib (no display needed).

    python plots.py out/demo/sft out/demo/reward out/demo/ppo    # writes <folder>/<step>_curves.png
    python plots.py out/demo/dpo                                 # dpo_curves.png

- `plot_sft(output_dir)`: train loss, eval loss and eval perplexity from the Trainer's log history;
- `plot_reward(output_dir)`: train loss, eval accuracy and eval margin, likewise;
- `plot_dpo(output_dir)`: dpo.py's train and eval loss, implicit-reward margin and accuracy, likewise;
- `plot_ppo(output_dir)`: a grid of ppo.py's metrics.jsonl curves (score, RLHF reward, KL, entropy, losses, clip
  fractions), each drawn faint as logged with an exponential moving average over it, since PPO curves are noisy.

The log history is read from output_dir/trainer_state.json (sft.py, reward.py and dpo.py write it at the end), else
from the newest complete checkpoint's. Each function returns the PNG's path, or None when there is nothing to plot yet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from simple_rlhf.errors import UserError, exit_on_user_error
from simple_rlhf import runs

logger = logging.getLogger("simple_rlhf")

PPO_PANELS = (  # (metrics.jsonl key, panel title, y label)
    ("objective/scores", "Reward model score", "mean score"),
    ("objective/rlhf_reward", "RLHF reward (score - KL penalty)", "reward"),
    ("objective/kl", "KL(actor || reference)", "KL per sequence"),
    ("objective/entropy", "Entropy of the samples", "nats per sequence"),
    ("loss/policy_avg", "Policy loss", "loss"),
    ("loss/value_avg", "Value loss", "loss"),
    ("policy/clipfrac_avg", "Policy clip fraction", "fraction"),
    ("val/clipfrac_avg", "Value clip fraction", "fraction"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on servers and in CI without a display
    import matplotlib.pyplot as plt

    return plt


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing) so it starts at the data."""
    out, mean, weight = [], 0.0, 0.0
    for value in values:
        mean = (1 - alpha) * mean + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def load_log_history(output_dir: str | Path) -> list[dict]:
    """The Trainer's log history: the final trainer_state.json, else the newest complete checkpoint's, else []."""
    candidates = [Path(output_dir) / "trainer_state.json"]
    newest = runs.newest_complete_checkpoint(output_dir)
    if newest:
        candidates.append(Path(newest) / "trainer_state.json")
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text()).get("log_history", [])
    return []


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    rows = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [r[0] for r in rows], [r[1] for r in rows]


def _trainer_figure(output_dir, panels, title: str, filename: str) -> Path | None:
    """One row of panels from the Trainer's log history; each panel a list of (key, label) curves."""
    history = load_log_history(output_dir)
    if not any(key in entry for entry in history for curves in panels.values() for key, _ in curves):
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (panel_title, curves) in zip(axes[0], panels.items()):
        for key, label in curves:
            steps, values = _series(history, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axis.set_title(panel_title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(curves[0][1] if len(curves) == 1 else panel_title.lower())
        axis.grid(alpha=0.3)
        if len(curves) > 1:
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(output_dir) / filename
    path = _save(figure, path, 80)
    plt.close(figure)
    return path


def plot_sft(output_dir: str | Path) -> Path | None:
    """sft_curves.png: train and eval loss, eval perplexity."""
    panels = {"Loss (answer tokens)": [("loss", "train loss"), ("eval_loss", "eval loss")],
              "Eval perplexity": [("eval_perplexity", "perplexity")]}
    return _trainer_figure(output_dir, panels, f"Step 1, SFT: {output_dir}", "sft_curves.png")


def plot_reward(output_dir: str | Path) -> Path | None:
    """reward_curves.png: train loss, eval accuracy (chosen scored above rejected), eval mean margin."""
    panels = {"Train loss": [("loss", "loss")], "Eval accuracy": [("eval_accuracy", "accuracy")],
              "Eval margin (chosen - rejected)": [("eval_margin", "mean margin")]}
    return _trainer_figure(output_dir, panels, f"Step 2, reward model: {output_dir}", "reward_curves.png")


def plot_dpo(output_dir: str | Path) -> Path | None:
    """dpo_curves.png: train and eval loss, and TRL's implicit reward (beta x log-ratio to the reference): the margin
    of chosen over rejected and the accuracy (chosen above rejected), on the train batches and the eval rows."""
    panels = {"Loss": [("loss", "train loss"), ("eval_loss", "eval loss")],
              "Reward margin (chosen - rejected)": [("rewards/margins", "train"), ("eval_rewards/margins", "eval")],
              "Reward accuracy": [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]}
    return _trainer_figure(output_dir, panels, f"DPO: {output_dir}", "dpo_curves.png")


def plot_ppo(output_dir: str | Path, smoothing: float | None = None) -> Path | None:
    """ppo_curves.png from output_dir/metrics.jsonl: raw curves faint, their EMA bold.

    `smoothing` is the EMA's weight of a new point; by default about 1/10 of the run, so that short and long runs
    are both readable.
    """
    metrics_file = Path(output_dir) / "metrics.jsonl"
    if not metrics_file.exists():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    alpha = smoothing or min(1.0, max(0.02, 10 / len(rows)))
    # Only the curves the run logged: rloo and grpo train no critic, so they have no value-loss panels.
    panels = [panel for panel in PPO_PANELS if any(panel[0] in row for row in rows)] or list(PPO_PANELS[:1])
    # With several reward sources (ppo.py --reward_funcs), one more panel holds them all: gold against proxy.
    sources = sorted({key for row in rows for key in row if key.startswith("rewards/")})
    columns = (len(panels) + (len(sources) > 1) + 1) // 2
    plt = _pyplot()
    figure, axes = plt.subplots(2, columns, figsize=(4 * columns, 7), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (key, panel_title, ylabel) in zip(axes.flat, panels):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1, label="per step")
            axis.plot(steps, ema(list(values), alpha), color="tab:blue", linewidth=2, label="smoothed (EMA)")
        axis.set_title(panel_title)
        axis.set_xlabel("PPO step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes.flat[0].legend()
    if len(sources) > 1:
        axis = axes.flat[len(panels)]
        axis.set_visible(True)
        # The reward model's scale is its own: it gets the left axis, the reward functions the right one.
        right = axis.twinx() if "rewards/model" in sources else axis
        lines = []
        for color, key in zip(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"), sources):
            on = axis if key == "rewards/model" else right
            steps, values = zip(*[(row["step"], row[key]) for row in rows if key in row])
            on.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            lines += on.plot(steps, ema(list(values), alpha), color=color, linewidth=2, label=key.split("/", 1)[1])
        axis.set_title("reward sources (gold vs proxy)")
        axis.set_xlabel("PPO step")
        axis.set_ylabel("reward model" if right is not axis else "mean reward")
        if right is not axis:
            right.set_ylabel("reward functions")
        axis.grid(alpha=0.3)
        axis.legend(lines, [line.get_label() for line in lines])
    figure.suptitle(f"Step 3, PPO: {output_dir} ({len(rows)} steps)")
    figure.tight_layout()
    path = _save(figure, Path(output_dir) / "ppo_curves.png", 70)
    plt.close(figure)
    return path


def _save(figure, path: Path, dpi: int) -> Path | None:
    """Write a chart; a chart that cannot be written (a full disk) is a warning, not a failed run: the model and
    the metrics it is drawn from are what the run is for."""
    try:
        figure.savefig(path, dpi=dpi)
    except OSError as error:
        logger.warning(f"could not write the chart {path} ({error.strerror or error}); the run's outputs are complete")
        return None
    return path


PLOTTERS = {"sft": plot_sft, "reward": plot_reward, "ppo": plot_ppo, "dpo": plot_dpo}


def plot_step(step: str, output_dir: str | Path) -> Path | None:
    """The chart of step `step` (sft, reward, ppo or dpo) for its output folder."""
    return PLOTTERS[step](output_dir)


def guess_step(output_dir: str | Path) -> str:
    """Which step wrote a folder: ppo.py writes metrics.jsonl; dpo.py logs rewards/margins; reward.py's eval results
    hold eval_accuracy."""
    output_dir = Path(output_dir)
    if (output_dir / "metrics.jsonl").exists():
        return "ppo"
    history = load_log_history(output_dir)
    if any("rewards/margins" in entry or "eval_rewards/margins" in entry for entry in history):
        return "dpo"
    return "reward" if any("eval_accuracy" in entry or "eval_margin" in entry for entry in history) else "sft"


@exit_on_user_error
def main(folders: list[str]) -> None:
    if not folders:
        raise UserError("give one or more step output folders, e.g. python plots.py out/demo/sft")
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: no such folder; give the output_dir of sft.py, reward.py, ppo.py or dpo.py")
        path = plot_step(guess_step(folder), folder)
        print(path if path else f"{folder}: nothing to plot yet (no log history or metrics.jsonl)")

