"""All-or-nothing output directories: everything is staged beside `--out` and renamed into place at once.

    out = OutputDir.claim("build", force=False, need_bytes=...)   # refusals happen here, before any work
    with out:                      # an exception (or SIGTERM, see `terminate_on_sigterm`) removes the stage
        write files into out.stage
        out.commit()               # the whole directory appears at once (replacing the old one with force)

A gate failure calls `out.reject(keep=True)` to move the stage to `OUT.rejected/` instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from slimfx.ir.errors import SlimfxError

# Room kept free on top of the estimate (reports, plots, filesystem slack).
SPARE_BYTES = 16 * 1024 * 1024


class OutputError(SlimfxError):
    """The output directory cannot be written as asked (exists without --force, not writable, no space)."""


_INPUTS: dict[Path, str] = {}  # files this process read as the user's inputs (resolved path -> what it is)


def note_input(path: str | os.PathLike, what: str) -> None:
    """Record a file the run reads (model, data, plugin or recipe file, saved model): no output replaces it."""
    _INPUTS[Path(path).resolve()] = what


def input_problem(target: str | os.PathLike, flag: str | None = None) -> str | None:
    """Why writing `target` (a file), or replacing it as a whole (the output directory named by `flag`), would
    destroy one of the run's inputs, or None."""
    resolved = Path(target).expanduser().resolve()
    for path, what in _INPUTS.items():
        if path == resolved or path.is_relative_to(resolved):
            where = "is" if path == resolved else f"holds {path},"
            if flag is None:
                return (f"{os.fspath(target)} {where} the {what} this run reads; slimfx never overwrites its own "
                        "inputs: give another path")
            return (f"{flag} {os.fspath(target)} {where} the {what} this run reads; slimfx never replaces its own "
                    f"inputs, even with --force (API: force=True): choose another {flag}")
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputDir:
    """A staged output directory (see the module docstring)."""

    def __init__(self, target: Path, force: bool, stage: Path):
        self.target, self.force, self.stage = target, force, stage
        self.committed = False

    @classmethod
    def claim(cls, out: str | os.PathLike, *, force: bool = False, need_bytes: int = 0,
              flag: str = "--out") -> OutputDir:
        """Check that `out` can be written, then create the stage beside it. Raises OutputError naming the
        problem and what to do; nothing is created then."""
        if not isinstance(out, (str, os.PathLike)):
            raise OutputError(f"{flag} must be a path (str or pathlib.Path), got {type(out).__name__}")
        text = os.fspath(out)
        if not str(text).strip():
            raise OutputError(f"{flag} is empty: name the directory to write, e.g. {flag} build")
        target = Path(text).expanduser()
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise OutputError(f"{flag} {text} exists and is not a directory; slimfx writes a directory of files "
                              f"there: choose another {flag}")
        if target.is_dir() and any(target.iterdir()) and not force:
            raise OutputError(f"{flag} {text} already exists and is not empty; slimfx replaces an output "
                              f"directory only as a whole: add --force (API: force=True) to replace it, or choose "
                              f"another {flag}")
        if Path.cwd().resolve().is_relative_to(target.resolve()):
            raise OutputError(f"{flag} {text} is the working directory or contains it; slimfx replaces its output "
                              f"directory as a whole: choose a new {flag} such as {flag} slimfx-out")
        problem = input_problem(target, flag)
        if problem:
            raise OutputError(problem)
        parent = target.resolve().parent
        if not parent.is_dir():
            try:
                parent.mkdir(parents=True)
            except OSError as e:
                raise OutputError(f"cannot create {parent} for {flag} {text}: {e.strerror or e}") from e
        stage = parent / f".{target.name}.slimfx-{secrets.token_hex(4)}"
        _LIVE.add(stage)  # before it exists: a signal at any point leaves nothing `remove_live_stages` misses
        try:
            stage.mkdir(mode=0o700)
        except OSError as e:
            _LIVE.discard(stage)
            raise OutputError(f"cannot write into {parent} ({flag} {text}): {e.strerror or e}; choose a "
                              f"writable {flag}") from e
        free = shutil.disk_usage(parent).free
        if need_bytes and free < need_bytes + SPARE_BYTES:
            _remove(stage)
            raise OutputError(f"{parent} has {free / 2**20:.1f} MiB free; the outputs need about "
                              f"{(need_bytes + SPARE_BYTES) / 2**20:.1f} MiB: free some space or choose another "
                              f"{flag}")
        os.chmod(stage, 0o777 & ~_umask())
        return cls(target, force, stage)

    # -- ending ----------------------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Move the stage into place as `target` (an existing target is replaced as a whole)."""
        old = None
        if self.target.exists():
            if not (self.force or not any(self.target.iterdir())):
                raise OutputError(f"{self.target} appeared while slimfx was working; nothing was written "
                                  "(add --force to replace it)")
            old = self.target.with_name(f".{self.target.name}.slimfx-old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        try:
            os.replace(self.stage, self.target)
        except OSError:
            if old is not None:
                os.replace(old, self.target)
            raise
        _LIVE.discard(self.stage)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.target

    def reject(self, keep: bool) -> Path | None:
        """A failed gate: discard the stage, or (keep) move it to `OUT.rejected/` (replacing an older one)."""
        if not keep:
            self.discard()
            return None
        rejected = self.target.with_name(self.target.name + ".rejected")
        if rejected.is_dir():
            shutil.rmtree(rejected)
        elif rejected.exists():
            rejected.unlink()
        os.replace(self.stage, rejected)
        _LIVE.discard(self.stage)
        self.committed = True
        return rejected

    def discard(self) -> None:
        _remove(self.stage)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            self.discard()


_LIVE: set[Path] = set()  # stages not yet committed or removed, in this process


def _remove(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    _LIVE.discard(stage)


def remove_live_stages() -> None:
    """Remove every stage this process created and did not commit (the CLI calls this on any way out)."""
    for stage in list(_LIVE):
        _remove(stage)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run as for Ctrl-C."""


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (cleanups run) instead of killing the process."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["OutputDir", "OutputError", "note_input", "input_problem", "Terminated", "terminate_on_sigterm",
           "remove_live_stages"]
