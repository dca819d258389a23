"""Output directories: what may be replaced, atomic writes, one writer at a time, leftovers of killed runs.

Nothing the user owns is deleted:
  * an existing output is replaced only with ``overwrite``, and only if it is empty or sparselm wrote it as
    the same kind of output (its marker file: ``sparselm.json`` for `compress`, ``sparselm-export.json`` for
    `export`);
  * never the input, a directory that contains the input, or one inside it;
  * writes go to ``.<name>.partial-<pid>`` beside the output and are renamed into place when complete; the
    old directory is moved aside first and removed only once the new one is in place;
  * ``.<name>.lock`` is held (``flock``) by the one run writing the output; the kernel drops it when that
    process ends, however it ends, so a lock left by a killed run is never mistaken for a live one;
  * ``.<name>.partial-<pid>`` (and ``.old-<pid>``) directories of processes that no longer run are removed
    (sparselm's own, never complete).
All checks here depend only on paths: the commands run them before any long work starts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import InputError

log = logging.getLogger(__name__)

MARKERS = {"compress": "sparselm.json", "export": "sparselm-export.json"}
_HELD: set[Path] = set()  # outputs this process holds the lock of (`locked` is re-entrant)


def _sibling(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}.{suffix}"


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies under it (both resolved)."""
    return a == b or b in a.parents


def check_out(out: Path, kind: str, overwrite: bool, sources: tuple[str | Path | None, ...] = ()) -> None:
    """Refuse an output path that cannot or must not be written (see the module rules), before any work."""
    where = f"--out {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise InputError(f"{where} is an existing file, not a directory", "choose a directory path for --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output directory {str(out)!r} already exists",
                             "choose another --out or pass --overwrite")
        if not (out / MARKERS[kind]).is_file():
            raise InputError(f"{where} exists and is not a sparselm {kind} output (no {MARKERS[kind]})",
                             "refusing to replace it even with --overwrite; choose another --out")
    target = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        source = Path(src).resolve()
        if _inside(target, source) or _inside(source, target):
            raise InputError(f"{where} is, contains or lies inside the input {str(src)!r}",
                             "write the result to a separate directory")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{where} lies under {str(parent)!r}, which is a file", "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{where}: {str(parent)!r} is not writable", "choose a directory you can write to")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_dir(out: Path) -> Path:
    """Where a `compress` writing ``out`` keeps the layers it finished (``--resume`` reads them)."""
    return _sibling(out, "resume")


def remove_stale_partials(out: Path) -> None:
    """Remove ``.<name>.partial-<pid>`` / ``.old-<pid>`` directories (of ``out`` and of its checkpoint) left by
    runs that were killed."""
    found = []
    for d in (out, checkpoint_dir(out)):
        found += [*d.parent.glob(f".{d.name}.partial-*"), *d.parent.glob(f".{d.name}.old-*")]
    for p in found:
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.info("removing %s, left by a run that was killed (pid %s)", p, pid)
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` while writing ``out``: a second run on the same output is refused (exit 2)."""
    if out.absolute() in _HELD:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _sibling(out, "lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"another sparselm run (pid {owner}) is writing {str(out)!r}",
                             "wait for it to finish, or choose another --out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # the lock file we hold is still the one at ``path`` (not unlinked by a finishing run)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(out.absolute())
        remove_stale_partials(out)
        yield
    finally:
        _HELD.discard(out.absolute())
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory that replaces ``out`` only if the block completes."""
    tmp = _sibling(out, f"partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(out, f"old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_error(path: Path, e: OSError) -> InputError:
    """An OSError while writing (disk full, permissions, read-only file system) as a user-facing error."""
    return InputError(f"could not write {str(path)!r} ({e.strerror or e})",
                      "free disk space or choose another --out; nothing was left behind")
