"""Run folders: logging, checkpoint markers, resume, safe re-runs (previous run set aside, swaps), atomic writes."""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from simple_rlhf.errors import UserError, describe

logger = logging.getLogger("simple_rlhf")


CHECKPOINT_COMPLETE = "checkpoint_complete.json"


def setup_logging(is_main_process: bool = True) -> None:
    """Log on the main process only."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_process else logging.WARNING,
        force=True,
    )


def log_distribution(accelerator) -> None:
    """One line saying how the run is distributed, e.g. `running as DEEPSPEED with 1 process(es) on cpu`."""
    logger.info(f"running as {accelerator.distributed_type.value} with {accelerator.num_processes} process(es) on "
                f"{accelerator.device}")


def checkpoint_is_complete(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_COMPLETE).exists()


def newest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint-N folder with the largest N that was written completely (half-written ones are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and checkpoint_is_complete(p)]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a path, or true for the newest complete checkpoint in output_dir."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if str(resume_from_checkpoint).lower() == "true" or resume_from_checkpoint is True:
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            logger.warning(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}; starting fresh")
        else:
            logger.info(f"resuming from {newest}")
        return newest
    if not Path(resume_from_checkpoint).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder; give a checkpoint-N "
                        "folder or true for the newest")
    if not checkpoint_is_complete(resume_from_checkpoint):
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: this checkpoint was not written "
                        f"completely (no {CHECKPOINT_COMPLETE}); use an older one or true")
    return str(resume_from_checkpoint)


RUN_FILES = ("config.json", "adapter_config.json", "metrics.jsonl", "trainer_state.json", "step_complete.json")


PREVIOUS_RUN = ".previous-run"


def run_contents(output_dir: str | Path) -> list[str]:
    """What in output_dir shows that a run wrote there (checkpoint-N folders, a final model, PPO metrics), sorted."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    checkpoints = sorted((p.name for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda name: int(name.split("-")[-1]))
    # An empty metrics.jsonl is what a PPO run that failed before its first step leaves: no run to protect.
    return checkpoints + [name for name in RUN_FILES if (path / name).exists()
                          and not (name == "metrics.jsonl" and (path / name).stat().st_size == 0)]


HELD_LOCKS: dict[Path, object] = {}  # lock file -> its open handle, locked until released or this process ends


def lock_output_dir(output_dir: str | Path, main_process: bool | None = None):
    """Only one run at a time may write into output_dir: two runs started into it a moment apart would both pass
    check_output_dir (neither has written anything yet) and mix their checkpoints and metrics. Call it before
    check_output_dir; the second run gets one line naming the first's pid.

    The lock is an flock on a hidden sibling file, .NAME.lock beside the folder: not inside it, since
    --overwrite_output_dir renames the folder and train.py swaps folders. The kernel releases it when the process
    ends, however it ends, so a crashed run never blocks the next; the file is removed at a normal exit. Only the
    main process of a multi-process run takes it (main_process; by default: RANK, set by torchrun, is 0 or unset).
    Returns a function that releases it, for a run that ends while its process goes on (in-process callers, tests).
    """
    if main_process is None:
        main_process = int(os.environ.get("RANK", "0")) == 0
    path = Path(output_dir).expanduser().resolve()
    lock = path.with_name(f".{path.name}.lock")
    if not main_process or lock in HELD_LOCKS:
        return lambda: None
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except PermissionError:  # the folder is ours but its parent is not: lock inside (nothing can rename it)
            path.mkdir(parents=True, exist_ok=True)
            lock = path / ".lock"
            handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"--output_dir {output_dir} is in use by another run (pid {owner}); wait for it or "
                            "choose another --output_dir")
        try:  # locked, unless the file was removed meanwhile by a run that just ended: then lock the new file
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    HELD_LOCKS[lock] = handle
    return lambda: unlock(lock)


def unlock(lock: Path) -> None:
    """Remove a lock file this process holds, then release it (in this order: see lock_output_dir)."""
    handle = HELD_LOCKS.pop(lock, None)
    if handle is not None:
        try:
            lock.unlink()
        except OSError:
            pass
        handle.close()


@atexit.register
def unlock_output_dirs() -> None:
    """At exit: every lock this process still holds."""
    for lock in list(HELD_LOCKS):
        unlock(lock)


def previous_run_dir(output_dir: str | Path) -> Path:
    """Where an overwritten run waits until its replacement has finished: the sibling OUTPUT_DIR.previous-run."""
    path = Path(output_dir).expanduser().resolve()
    return path.with_name(path.name + PREVIOUS_RUN)


def check_output_dir(output_dir: str | Path, overwrite: bool, resume) -> None:
    """Before anything is loaded or written (on every process: it only reads): a fresh run must not mix with another
    run's checkpoints or final model in output_dir. Allowed: an empty, missing or unrelated folder; `overwrite`
    (set_previous_run_aside then moves the old run away); `resume` (a checkpoint path, or "true"/True: the newest
    complete checkpoint, refused when there is none but a finished model, which a restart would silently mix with).
    """
    resuming = resume not in (None, False, "", "false", "False")
    if overwrite and resuming:
        raise UserError("--overwrite_output_dir true and --resume_from_checkpoint: choose one (overwrite starts a new "
                        "run, resume continues the one in output_dir)")
    contents = run_contents(output_dir)
    if overwrite:
        target = Path(output_dir).expanduser().resolve()
        if contents and any(target == p or target in p.parents for p in (Path.cwd().resolve(), Path.home().resolve())):
            raise UserError(f"--overwrite_output_dir true: {output_dir} contains the current folder or your home; "
                            "give the run a folder of its own")
        return
    if not contents:
        return
    if resuming:
        finished = [name for name in ("config.json", "adapter_config.json") if name in contents]
        if str(resume).lower() == "true" and newest_complete_checkpoint(output_dir) is None and finished:
            raise UserError(f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint to resume, but "
                            f"a finished model ({', '.join(finished)}); pass --overwrite_output_dir true to replace "
                            "it, or choose another --output_dir")
        return
    checkpoints = [name for name in contents if name.startswith("checkpoint-")]
    shown = ", ".join(checkpoints[-1:] + contents[len(checkpoints):])  # the newest checkpoint and the files
    raise UserError(f"--output_dir {output_dir} already holds a run ({shown}); pass --resume_from_checkpoint true to "
                    "continue it, --overwrite_output_dir true to replace it (the old run is deleted once the new one "
                    "has finished), or choose another --output_dir")


def set_previous_run_aside(output_dir: str | Path) -> Path | None:
    """For --overwrite_output_dir, on the main process, right before training starts: rename output_dir (when it
    holds a run) to OUTPUT_DIR.previous-run in one atomic step and start from an empty folder. If that sibling is
    already there, an earlier overwrite did not finish: the sibling still holds the last finished run and is kept,
    and output_dir (that attempt's unfinished outputs) is discarded. Returns the sibling, or None when nothing moved.
    """
    path = Path(output_dir).expanduser().resolve()
    aside = previous_run_dir(path)
    if not run_contents(path):
        return None
    try:
        if aside.exists():
            logger.warning(f"{aside} holds the run before an unfinished overwrite: kept; discarding the unfinished "
                           f"outputs in {path}")
            shutil.rmtree(path)
        else:
            path.rename(aside)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--overwrite_output_dir true: could not move the previous run in {output_dir} aside "
                        f"({describe(error)}); move or delete it yourself")
    logger.info(f"--overwrite_output_dir: the previous run is in {aside} until this run has saved its final model")
    return aside


def drop_previous_run(output_dir: str | Path) -> None:
    """After the new run has saved its final model (main process): delete OUTPUT_DIR.previous-run, if any. It is
    renamed first, so that a crash half-way never leaves a half-deleted folder under the name that means "the last
    finished run"."""
    aside = previous_run_dir(output_dir)
    if aside.exists():
        doomed = aside.with_name(f"{aside.name}.deleting-{os.getpid()}")
        aside.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def swap_in(new: str | Path, target: str | Path) -> None:
    """Replace the folder `target` by the finished folder `new`: target -> TARGET.old, new -> target, then delete
    TARGET.old. A crash in between is repaired by finish_interrupted_swap."""
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def finish_interrupted_swap(target: str | Path, ready) -> None:
    """Repair a swap_in that a crash cut short: with `target` gone and TARGET.old there, complete the swap when
    TARGET.new is `ready(folder)` (finished), else put the old folder back. A leftover TARGET.old next to a target
    is the deletion that did not happen."""
    target = Path(target)
    old, new = target.with_name(target.name + ".old"), target.with_name(target.name + ".new")
    if old.exists() and not target.exists():
        if new.exists() and ready(new):
            new.rename(target)
        else:
            old.rename(target)
    if old.exists():
        shutil.rmtree(old)


def mark_checkpoint_complete(path: str | Path, **info) -> None:
    """Written last into a checkpoint folder: its presence means every other file is there."""
    write_json(Path(path) / CHECKPOINT_COMPLETE, info)


def move_into(source: str | Path, target: str | Path) -> None:
    """Move every entry of `source` into `target` (rename per entry, replacing what is there), then drop `source`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for entry in Path(source).iterdir():
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    shutil.rmtree(source, ignore_errors=True)


def print_table(rows: list[list]) -> None:
    """Print rows as aligned columns, the first row a header underlined with dashes (summaries and results)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a .partial file renamed into place), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def make_accelerator(args):
    """The Accelerator of a hand-written training loop (ppo.py), configured from its arguments; logging set up."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # accelerate launch exports the DeepSpeed config's "auto" here; the PPO arguments decide, as in TRL's trainers.
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") == "auto":
        del os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
    # use_cpu (set automatically without a GPU) makes torchrun's processes one MULTI_CPU group, but cpu=True would
    # also silently turn an `accelerate launch` DeepSpeed config into plain MULTI_CPU: DeepSpeed keeps its own.
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(cpu=args.use_cpu and not deepspeed_launch, mixed_precision="bf16" if args.bf16 else None,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=None if args.report_to == "none" else args.report_to.split(","),
                              project_dir=args.output_dir)
    setup_logging(accelerator.is_main_process)
    log_distribution(accelerator)
    set_seed(args.seed)
    return accelerator
