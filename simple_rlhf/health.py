"""Run health: the divergence guard, weight statistics, and a clean stop on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import math
import resource
import signal

import torch
import torch.nn as nn

from simple_rlhf import actor_critic

logger = logging.getLogger("simple_rlhf")


WEIGHT_GROWTH_LIMIT = 100.0  # see divergence


def divergence(metrics: dict, max_kl: float, weights_at_start: dict) -> str | None:
    """What shows that training has blown up, or None. A run that goes on from there only wrecks the model while
    exiting 0, so main stops it (exit 3) and keeps the last good checkpoint. Three signs:
    - any metric not finite (NaN or inf: scores, KL, losses, gradient norm, weights);
    - |objective/kl| beyond max_kl nats per sequence (default 1 per response token: the sampled tokens are then on
      average e times likelier under the policy than under the reference it should stay close to);
    - the RMS of the trainable weights of the actor or critic (weights/*_rms) over WEIGHT_GROWTH_LIMIT times what it
      was at the start: an optimizer step of lr 1e6 moves every weight by about 1e6, a sane one barely moves it.
    """
    bad = [name for name, value in metrics.items() if isinstance(value, (int, float)) and not math.isfinite(value)]
    if bad:
        return f"non-finite {', '.join(bad)}"
    kl = metrics["objective/kl"]
    if abs(kl) > max_kl:
        return f"objective/kl {kl:.4g} is beyond --max_kl {max_kl:g} (nats per sequence)"
    for name, start in weights_at_start.items():
        if metrics[name] > WEIGHT_GROWTH_LIMIT * max(start, 1e-3):
            return f"{name} {metrics[name]:.4g} grew over {WEIGHT_GROWTH_LIMIT:g}x its {start:.4g} at the start"
    return None


@torch.no_grad()
def weight_metrics(accelerator, unwrapped: nn.Module) -> dict:
    """{"weights/actor_rms", "weights/critic_rms"}: the root mean square of each role's trainable weights, over
    every process's shard under ZeRO-3 (every process must call it)."""
    out = {}
    for role in ("actor", "critic"):
        module = getattr(unwrapped, role, None)
        params = actor_critic.trainable_parameters(module) if module is not None else []
        if not params:
            continue
        sharded = any(hasattr(p, "ds_tensor") for p in params)
        local = [p.ds_tensor if sharded else p for p in params]
        squares = torch.nn.utils.get_total_norm([t.detach() for t in local]).float() ** 2  # no float32 copies
        if sharded:
            squares = accelerator.reduce(squares.to(accelerator.device), "sum")
        count = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        out[f"weights/{role}_rms"] = math.sqrt(squares.item() / max(count, 1))
    return out


def check_weights_finite(accelerator, unwrapped: nn.Module, what: str) -> None:
    """Refuse to save `what` when the trainable weights hold NaN or inf (the same answer on every process)."""
    bad = [name for name, value in weight_metrics(accelerator, unwrapped).items() if not math.isfinite(value)]
    if bad:
        raise TrainingDiverged(f"non-finite {', '.join(bad)}: {what} not written")


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, writes a checkpoint and exits 0."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Give the caller (a test, the bench) its own handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        logger.warning(f"received {signal.Signals(signum).name}: finishing this step, then checkpoint and exit")
        self.requested = True


class RunStopped(Exception):
    """The run cannot go on, through no mistake in its arguments: ppo.py prints `error: <message>` (one line, on the
    main process) and exits with exit_code; the last complete checkpoint is kept."""

    exit_code = 1


class TrainingDiverged(RunStopped):
    """The run blew up (see divergence): one line on stderr, exit code 3, the last good checkpoint kept."""

    exit_code = 3


class WriteFailed(RunStopped):
    """A checkpoint or the final model could not be written (the disk full, a permission, an I/O error): one line on
    stderr, exit code 4; the half-written folder removed, the last complete checkpoint kept."""

    exit_code = 4


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
