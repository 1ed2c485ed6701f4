"""Where a run writes and what it names: the output, the work directory and model folders,
checked before anything heavy starts.

The tool replaces its output whole and cleans up in its work directory, so neither may be a
folder of the user's: the output must be new or a student (holding only a student's files),
the work directory new, empty or marked as the tool's (``WORK_MARKER``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llama_index_d2llm.folder_lock import describe_holder
from llama_index_d2llm.student.backbone import resolve_backbone
from llama_index_d2llm.student.config import CONFIG_NAME
from llama_index_d2llm.student.storage import STUDENT_FILES, check_student_target
from llama_index_d2llm.trainer.checkpoints import CHECKPOINTS_DIR
from llama_index_d2llm.trainer.config import (
    DISTILL_CONFIG_NAME,
    NO_TEACHER,
    ConfigError,
    DistillConfig,
)

SUMMARY_NAME = "training_summary.json"
#: What ``distill`` writes into a student directory: anything else there is the user's.
DISTILLED_FILES = (*STUDENT_FILES, DISTILL_CONFIG_NAME, SUMMARY_NAME)
#: Written into every work directory the tool makes: only such a folder is ever cleaned up.
WORK_MARKER = ".d2llm-work"
#: Locked by the run using a work directory; it says which process that is.
WORK_LOCK = ".d2llm-lock"
_WORK_ENTRIES = frozenset({"queries", "negatives", "teacher", "token_states", CHECKPOINTS_DIR,
                           WORK_LOCK})


def check_output(path: str | os.PathLike) -> Path:
    """The output may be new or a student written before; never another folder of the user's,
    and never one holding files besides the student's (they would be lost when it is swapped)."""
    output = Path(path).expanduser().resolve()
    if output.exists() and (not output.is_dir() or (
            any(output.iterdir()) and not (output / CONFIG_NAME).exists())):
        raise ConfigError(f"--output {str(output)!r} exists and is not a D2LLM student; it would "
                          "be replaced: choose a new directory")
    check_student_target(output, DISTILLED_FILES)
    return output


def check_work_dir(config: DistillConfig) -> Path:
    """The work directory may be new, empty, or one this tool made (it holds ``WORK_MARKER``).

    A fresh run clears old checkpoints in it, so a folder of the user's is refused.
    """
    work = config.work_path.expanduser().resolve()
    if work.exists() and (not work.is_dir() or (any(work.iterdir()) and not _made_here(work))):
        raise ConfigError(
            f"--work-dir {str(work)!r} exists and was not made by d2llm-rag (it has no "
            f"{WORK_MARKER} file); a run cleans up in its work directory: choose a new or empty "
            f"folder (if it is the work directory of an earlier run, create an empty "
            f"{WORK_MARKER} file in it)"
        )
    return work


def _made_here(work: Path) -> bool:
    """Marked by this tool, or written before the marker existed: only the stages' folders,
    and checkpoints that are all the trainer's."""
    if (work / WORK_MARKER).exists():
        return True
    if not {entry.name for entry in work.iterdir()} <= _WORK_ENTRIES:
        return False
    checkpoints = work / CHECKPOINTS_DIR
    return not checkpoints.exists() or all(
        entry.name.startswith(("step-", ".checkpoint-")) for entry in checkpoints.iterdir())


def check_run_paths(config: DistillConfig) -> tuple[Path, Path]:
    """The output and the work directory, checked (``check_output``, ``check_work_dir``) and
    apart: the output is replaced whole, so the work directory may not be inside it."""
    output = check_output(config.output)
    work = check_work_dir(config)
    if work == output or output in work.parents:
        raise ConfigError(f"--work-dir {str(work)!r} is inside --output {str(output)!r}, which "
                          "is replaced whole when the student is written: put it beside")
    return output, work


@contextmanager
def hold_work_dir(config: DistillConfig) -> Iterator[Path]:
    """Lock the run's work directory for the block; a second run on it is refused, naming
    the process that holds it (the lock goes with that process, even when it is killed).

    Two runs on one work directory and output would both run and overwrite each other's
    caches and student, the last writer winning. Only the main process of a multi-process
    launch (``RANK`` 0) takes the lock. A work directory created here and left with nothing
    but the lock (the inputs were refused) is removed again.
    """
    _, work = check_run_paths(config)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield work
        return
    import fcntl

    created = next((p for p in reversed([work, *work.parents]) if not p.exists()), None)
    work.mkdir(parents=True, exist_ok=True)
    handle = open(work / WORK_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ConfigError(
                f"--work-dir {str(work)!r} is in use by another d2llm-rag run "
                f"({describe_holder(handle.read())}): wait for it to end or stop it, or "
                "pass another --output (or --work-dir)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        yield work
    finally:
        if created is not None and {p.name for p in work.iterdir()} <= {WORK_LOCK}:
            shutil.rmtree(created, ignore_errors=True)
        handle.close()


def claim_work_dir(config: DistillConfig) -> Path:
    """Create the work directory (checked by ``check_work_dir``) and mark it as the tool's."""
    work = check_work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    marker = work / WORK_MARKER
    if not marker.exists():
        marker.write_text("made by d2llm-rag distill: caches and checkpoints of a run\n")
    return work


def check_model_paths(config: DistillConfig) -> None:
    """A --student/--teacher meant as a local folder must exist (not end as a hub id error)."""
    teacher = None if config.teacher == NO_TEACHER else config.teacher
    for flag, name in (("--student", config.student), ("--teacher", teacher)):
        if name is None:
            continue
        try:
            path = resolve_backbone(name)
        except FileNotFoundError:
            raise ConfigError(f"{flag} {name!r}: the path does not exist; pass a local model "
                              "folder, a hub id cached locally, or leave it out for the "
                              "offline Gemma 3 270M") from None
        if Path(path).is_dir():  # a model that needs its own code fails now, not after hours
            from transformers import AutoConfig

            try:
                AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
            except ValueError as exc:
                if "trust_remote_code" not in str(exc):
                    raise
                raise ConfigError(
                    f"{flag} {name!r} needs to run its own Python code to load, which is off "
                    "unless asked: pass --trust-remote-code if you trust its source, or use "
                    "another model") from exc
