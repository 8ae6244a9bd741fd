"""A run owns its directory: one run at a time (a lock naming its holder), nothing foreign in it, no input
overwritten, paths read from it stay inside it, and `--resume` continues only what this run wrote.

- `check_out(run_dir, ...)` (read-only, before anything is written): `--out` is a folder (or does not exist
  yet), holds only what runs write, and is not where an input of the run lives (the recipe file itself, a
  checkpoint) - a run writes recipe.yaml, log.txt, report.json, stages/ and its artifact there.
- `claim(run_dir)`: creates the folder and takes `compress.lock` (an flock, so a killed run never leaves a
  stale lock); a second run on the same folder fails at once naming the holder's pid.
- `inside(run_dir, relative)`: a path read from report.json resolved inside the run directory, or refused.
- `verify_finished(...)`: for `--resume`, every finished stage's checkpoint must still have the SHA-256 the
  report recorded, and the stored recipe must exist and agree.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from compress.errors import RunDirError

LOCK = "compress.lock"
RUN_FILES = {"recipe.yaml", "log.txt", "report.json", "stages", LOCK, "report.html", "accuracy_vs_size.png",
             "layers.png", "time_per_stage.png"}


def _is_temp(name: str) -> bool:
    """Temp files of atomic writes (`.NAME.XXXX.tmp`), left by a kill."""
    return name.startswith(".") and name.endswith(".tmp")


def check_out(run_dir: Path, extra_files: Iterable[str] = (), inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an --out that is a file, that holds files no run writes, or that an input of the run lives in
    where the run would write. Writes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir}: is a file, not a folder; choose a folder (new or a run's)")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--out {run_dir}: {parent} is a file, not a folder")
            break
    allowed = RUN_FILES | set(extra_files)
    written = {(run_dir / name).resolve() for name in allowed if name != "stages"}
    for item in inputs:
        if item is not None and Path(item).expanduser().resolve() in written:
            raise RunDirError(f"--out {run_dir}: the run would overwrite its own input {item}; choose another --out")
    if not run_dir.is_dir():
        return
    names = [p.name for p in run_dir.iterdir() if not _is_temp(p.name)]
    if "recipe.yaml" not in names and "report.json" not in names:
        allowed = {LOCK}  # a run writes recipe.yaml first: without it, nothing here is a run's
    foreign = sorted(name for name in names if name not in allowed)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise RunDirError(f"--out {run_dir}: holds files that are not from a compress run ({shown}); choose a new "
                          "or empty folder")


def _within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def inside(run_dir: Path, relative: Any, field: str) -> Path:
    """`run_dir / relative` for a relative path read from the run directory, refused unless it stays inside."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise RunDirError(f"{run_dir}: {field} must be a relative path (got {relative!r})")
    rel = Path(relative)
    root = run_dir.resolve()
    target = (run_dir / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not _within(target, root):
        raise RunDirError(f"{run_dir}: {field} {relative!r} points outside the run directory; refused")
    return run_dir / rel


def holder(run_dir: Path) -> str:
    try:
        text = (run_dir / LOCK).read_text().strip()
    except OSError:
        return "another process"
    return text[:200] or "another process"


@contextlib.contextmanager
def claim(run_dir: Path, is_main: bool = True) -> Iterator[dict[str, bool]]:
    """Create `run_dir` and hold its lock. Yields a dict: until the run sets "started" (its first stage begins),
    a failure removes what the run wrote in a folder it created, so bad input leaves nothing behind."""
    state = {"started": False}
    if not is_main:
        yield state
        return
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock, the other rules still hold
        fcntl = None
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {run_dir}: cannot create the folder ({exc.strerror or exc})") from None
    path = run_dir / LOCK
    if fcntl is None:
        yield state
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"--out {run_dir}: another run is using this folder ({holder(run_dir)}); wait for "
                                  "it or choose another --out") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file unlinked meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    ok = False
    try:
        yield state
        ok = True
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            if not ok and not state["started"]:
                _remove_if_only_setup(run_dir)
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty


def _remove_if_only_setup(run_dir: Path) -> None:
    """A run that failed before its first stage finished leaves nothing behind in a folder it created."""
    if (run_dir / "report.json").exists():
        return
    for name in ("recipe.yaml", "log.txt"):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when empty (stages/ of a stage that was being written stays)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_report(run_dir: Path) -> dict[str, Any]:
    """report.json of a run, every field `compress report` uses checked (RunDirError naming the field)."""
    import json

    path = run_dir / "report.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no report.json (is this a run directory of `compress run`?)")
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc.__class__.__name__}); the run directory is damaged") from None
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise RunDirError(f"{path}: not a report of `compress run` (a JSON object with a 'stages' list)")
    if not isinstance(report.get("recipe"), str) or not isinstance(report.get("task", ""), str):
        raise RunDirError(f"{path}: 'recipe' and 'task' must be strings")
    number = (int, float)
    for i, stage in enumerate(report["stages"]):
        where = f"{path}: stages.{i}"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise RunDirError(f"{where} must be an object with a name")
        metrics = stage.get("metrics")
        if not isinstance(metrics, dict) or not all(isinstance(v, number) and not isinstance(v, bool)
                                                    for v in metrics.values()):
            raise RunDirError(f"{where}.metrics must map names to numbers")
        for key in ("params", "macs", "size_bytes", "bits_per_weight", "seconds"):
            value = stage.get(key)
            if not isinstance(value, number) or isinstance(value, bool) or not value >= 0:  # NaN fails too
                raise RunDirError(f"{where}.{key} must be a number >= 0 (got {value!r})")
        if stage["size_bytes"] <= 0 or stage["params"] <= 0:
            raise RunDirError(f"{where}: params and size_bytes must be > 0")
        checkpoint = inside(run_dir, stage.get("checkpoint"), f"report.json stages.{i}.checkpoint")
        if not checkpoint.is_file():
            raise RunDirError(f"{where}: checkpoint {checkpoint} is missing")
        if "sha256" in stage and stage["sha256"] != file_sha256(checkpoint):
            raise RunDirError(f"{checkpoint} is not the file stage {stage['name']} wrote (SHA-256 differs from "
                              "report.json)")
    return report
