"""Replacing a file safely: a locked temporary file next to the target, renamed over it.

``save`` must never lose data or replace the wrong thing, so:

- the target is resolved first: a symlink is written through (the link stays a link
  and its target gets the new file), and anything that is not a regular file (a
  directory, a device such as ``/dev/null``, a FIFO, a socket) is refused;
- the temporary file ``.<name>.<pid>-<token>.partial`` is created with mode
  ``0o666`` less the umask, like any new file, and given an existing target's
  permission bits before the rename;
- it holds an exclusive ``flock`` while it lives, so a later save to the same path
  can tell a temporary file left by a killed process (``SIGKILL``) from one that a
  live save is writing, and removes only the former, and only names of this pattern;
- while the temporary file exists, ``SIGTERM`` (if no other handler is installed)
  first removes it, then ends the process as the default action would.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import threading
from pathlib import Path
from typing import Any

try:  # POSIX only; elsewhere stale temporary files are left in place.
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".partial"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def resolve_target(path: str | os.PathLike) -> tuple[Path, os.stat_result | None]:
    """The file a save replaces (symlinks followed) and its ``stat``, ``None`` if new.

    Raises:
        FileExistsError: ``path`` (or what its symlink points to) exists and is not a
            regular file; the message names both.
        FileNotFoundError: the target's directory does not exist.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> os.symlink("real.jxc", os.path.join(folder, "link.jxc"))
        >>> target, info = resolve_target(os.path.join(folder, "link.jxc"))
        >>> target.name, info
        ('real.jxc', None)
        >>> resolve_target(folder)
        Traceback (most recent call last):
        ...
        FileExistsError: ... is a directory; save replaces only regular files
    """
    target = Path(os.path.realpath(path))
    try:
        info = target.stat()
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise FileNotFoundError(
                f"directory {str(Path(path).parent)!r} does not exist"
            ) from None
        return target, None
    if not stat.S_ISREG(info.st_mode):
        via = "" if str(target) == os.path.abspath(path) else f" (the target of {str(path)!r})"
        raise FileExistsError(
            f"{str(target)!r}{via} is {_kind(info.st_mode)}; save replaces only regular files"
        )
    return target, info


def _partial_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.([1-9][0-9]{{0,9}})-[0-9a-f]{{8}}\.partial")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or no pid we know: leave its file
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Removes temporary files of earlier saves to ``target`` whose process died.

    Only names of this module's pattern for ``target`` are considered, and one is
    removed only when its process id is not running on this machine *and* nothing
    holds its lock (a live save on another machine sharing the folder still does).

    Returns:
        The removed paths.

    Example:
        >>> import os, tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / ".m.jxc.4194303-0123abcd.partial").write_bytes(b"left by a kill")
        14
        >>> (folder / "m.jxc.notes").write_text("not ours")
        8
        >>> [p.name for p in sweep_stale(folder / "m.jxc")], sorted(os.listdir(folder))
        (['.m.jxc.4194303-0123abcd.partial'], ['m.jxc.notes'])
    """
    if fcntl is None:
        return []
    pattern, removed = _partial_pattern(target), []
    with os.scandir(target.parent) as entries:
        candidates = [e for e in entries if pattern.fullmatch(e.name)]
    for entry in candidates:
        match = pattern.fullmatch(entry.name)
        assert match is not None  # filtered above
        if not entry.is_file(follow_symlinks=False) or _process_alive(int(match[1])):
            continue
        try:
            handle = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue  # locked by a live writer, or already gone
        finally:
            os.close(handle)
    return removed


def create_partial(target: Path, mode: int | None) -> tuple[int, Path]:
    """Creates and locks a new temporary file next to ``target``; returns ``(fd, path)``.

    Args:
        target: the file it will replace.
        mode: permission bits to give it (an existing target's); ``None`` keeps the
            default of a new file, ``0o666`` less the umask.

    Example:
        >>> import os, tempfile
        >>> from pathlib import Path
        >>> fd, temp = create_partial(Path(tempfile.mkdtemp()) / "m.jxc", 0o640)
        >>> oct(os.stat(temp).st_mode & 0o777), temp.name.startswith(".m.jxc.")
        ('0o640', True)
        >>> os.close(fd)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    while True:
        temp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}")
        try:
            handle = os.open(temp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if mode is not None:
            os.chmod(handle, mode)
    except BaseException:
        os.close(handle)
        temp.unlink(missing_ok=True)
        raise
    return handle, temp


class Terminated(BaseException):
    """Raised in the main thread by ``SIGTERM`` while a temporary file exists."""


class SigtermCleanup:
    """While active, ``SIGTERM`` raises :class:`Terminated` so the temporary file is removed.

    Installed only from the main thread and only over the default action, so a
    program's own ``SIGTERM`` handler is left alone. :meth:`finish` restores the
    default and, if the signal came, ends the process with it as before.

    Example:
        >>> guard = SigtermCleanup()
        >>> guard.finish(terminated=False)
    """

    def __init__(self) -> None:
        self.active = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        )
        self._exiting = False
        self._pending = False
        if self.active:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._exiting:
            self._pending = True  # cleanup is under way; die once it is done
        else:
            raise Terminated(f"signal {signum} while saving")

    def begin_cleanup(self) -> None:
        """From now on a ``SIGTERM`` waits for :meth:`finish` instead of raising."""
        self._exiting = True

    def finish(self, *, terminated: bool) -> None:
        """Restores the default action, then re-raises a ``SIGTERM`` that came."""
        if not self.active:
            return
        self.active = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if terminated or self._pending:
            signal.raise_signal(signal.SIGTERM)
