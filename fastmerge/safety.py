"""What a run may do to the user's files: one place for every output directory fastmerge writes.

- ``check_target``: an output may not be, hold, or lie inside an input model, nor be or hold the
  recipe/config file or the working directory (``--force`` would delete them; writing inside a
  model changes it). Paths are compared after ``realpath``.
- ``OutputClaim``: the run's hold on its output for its whole length. An exclusive ``flock`` on
  ``.<name>.fastmerge.lock`` beside the target (a second run to the same target fails at once,
  naming the holder's pid); temporaries ``.<name>.fastmerge-tmp-<pid>-<random>`` beside the target
  whose owner is the lock holder, so any temporary found by a new holder is stale (its run was
  killed) and is removed, with a notice; and ``commit``, the atomic move into place: a rename that
  never replaces (``RENAME_NOREPLACE``), or with ``force`` an atomic exchange with the old output
  (``RENAME_EXCHANGE``), which is removed afterwards. Where the filesystem has neither (NFS, some
  cluster filesystems) two plain renames are used; a run killed between them leaves the old output
  as ``.<name>.fastmerge-old-<pid>-<random>``, which the next run to the target puts back.
- The existence of the output is checked when the run starts and again at the commit (another
  program may have made it meanwhile): it is replaced only with ``force``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FastmergeError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: what ``check_target`` protects: ("model", path) may not even contain the output
Protected = tuple[str, str | os.PathLike]


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def protected_inputs(models: Iterable[str | os.PathLike | None] = (), files: Iterable[tuple[str, str | os.PathLike]] = (),
                     cwd: bool = True) -> list[tuple[str, str, Path]]:
    """(what, as given, real path) of everything an output must leave alone: the input model
    directories (only those that exist locally: a hub id is no path), named files (the recipe), and
    the working directory."""
    out: list[tuple[str, str, Path]] = []
    for m in models:
        if m is not None and os.path.exists(os.path.expanduser(os.fspath(m))):
            out.append(("the input model", os.fspath(m), _real(m)))
    for what, f in files:
        if f is not None and os.path.exists(os.path.expanduser(os.fspath(f))):
            out.append((what, os.fspath(f), _real(f)))
    if cwd:
        out.append(("the working directory", os.getcwd(), _real(os.getcwd())))
    return out


def given_file(arg: object) -> Path | None:
    """The file a recipe or config argument names, if it names one (it may be YAML text or a dict)."""
    try:
        return Path(arg) if isinstance(arg, (str, Path)) and Path(arg).is_file() else None
    except (OSError, ValueError):  # YAML text: too long, or holding a NUL, for a file name
        return None


def check_target(out: str | os.PathLike, protected: list[tuple[str, str, Path]], label: str = "output") -> None:
    """Refuse an output that is or holds a protected path, or lies inside an input model."""
    target = _real(out)
    for what, given, real in protected:
        if target == real:
            raise FastmergeError(f"{out}: the {label} is {what} {given}; refusing to write there "
                                 "(choose another output directory)")
        if _within(real, target):
            raise FastmergeError(f"{out}: the {label} holds {what} {given}; refusing to replace it "
                                 "(choose another output directory)")
        if what == "the input model" and _within(target, real):
            raise FastmergeError(f"{out}: the {label} is inside {what} {given}; refusing to write into a model "
                                 "(choose another output directory)")


# ----------------------------------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """renameat2(2): 0, or the errno (EINVAL/ENOSYS where the filesystem or libc lacks it)."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return errno.ENOSYS
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


_LIBC: list = []


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def remove_path(p: Path) -> None:
    """Remove a file, link or directory tree (nothing if absent)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done (only the main thread can do this; elsewhere
    the block just runs), then are acted on as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler Python did not install; leave it be
            old[sig] = signal.signal(sig, lambda s, f: caught.append(s))
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for sig in caught:
            h = old[sig]
            if callable(h):
                h(sig, None)
            elif h == signal.SIG_DFL:
                if sig == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------------------- the claim


class OutputClaim:
    """A run's hold on its output directory (see the module docstring); a context manager.

    Entering locks the target, removes stale temporaries, re-checks the target and makes the
    temporary directory ``tmp``; ``commit`` moves ``tmp`` into place; leaving removes whatever
    temporary is left (a failure or Ctrl-C leaves nothing) and drops the lock.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False,
                 protected: list[tuple[str, str, Path]] | None = None, label: str = "output",
                 staged: bool = True) -> None:
        self.out = Path(out)
        self.force = force
        self.protected = protected or []
        self.label = label
        self.staged = staged  # False: the run writes into the (possibly existing) target itself (evolve)
        self.tmp: Path | None = None
        self._fd: int | None = None
        self._lock: Path | None = None

    # -- the checks a run can make before it does any work (and that are made again under the lock)

    def check(self) -> None:
        check_target(self.out, self.protected, self.label)
        if self.staged and not self.force and os.path.lexists(self.out):
            raise FastmergeError(f"{self.out}: output exists; pass --force to replace it")

    @property
    def parent(self) -> Path:
        """The output's real parent directory (``out`` itself may be a link: the link is replaced)."""
        return _real(os.path.dirname(os.path.abspath(self.out)))

    @property
    def name(self) -> str:
        name = os.path.basename(os.path.abspath(self.out))
        if not name:
            raise FastmergeError(f"{self.out}: not a directory name an output can have")
        return name

    def __enter__(self) -> OutputClaim:
        self.check()
        parent = self.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FastmergeError(f"{self.out.parent}: cannot create the output's directory ({e.strerror})") from None
        self._acquire(parent / f".{self.name}.fastmerge.lock")
        try:
            self._clean_stale(parent)
            self.check()  # again, now that no other fastmerge can change it
            if self.staged:
                self.tmp = parent / f".{self.name}.fastmerge-tmp-{os.getpid()}-{secrets.token_hex(4)}"
                self.tmp.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.tmp is not None:
                remove_path(self.tmp)
        finally:
            self._release()

    # -- the lock

    def _acquire(self, lock: Path) -> None:
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise FastmergeError(f"{lock}: cannot create the output's lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise FastmergeError(f"{self.out} is being written by another fastmerge process "
                                     f"(pid {pid if pid else 'unknown'})") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the one in place
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd, self._lock = fd, lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._lock is not None:
                self._lock.unlink(missing_ok=True)  # while still holding it: a waiter then retries on a new file
        finally:
            os.close(self._fd)
            self._fd = self._lock = None

    # -- stale temporaries

    def _clean_stale(self, parent: Path) -> None:
        """Holding the lock, every temporary of this target is a killed run's: remove it (or put a
        previous output back where a killed fallback commit had moved it aside)."""
        pattern = re.compile(rf"\.{re.escape(self.name)}\.fastmerge-(tmp|old)-(\d+)(?:-[0-9a-f]+)?")
        try:
            entries = sorted(os.listdir(parent))
        except OSError:
            return
        for entry in entries:
            m = pattern.fullmatch(entry)
            if m is None:
                continue
            path = parent / entry
            kind, pid = m.groups()
            try:
                if kind == "old" and not os.path.lexists(parent / self.name):
                    os.rename(path, parent / self.name)
                    warnings.warn(f"{self.out}: put back the previous output, which an interrupted fastmerge run "
                                  f"(pid {pid}) had moved aside to {entry}", stacklevel=3)
                    continue
                remove_path(path)
            except OSError as e:  # not ours to remove (another user's), or the disk fails: say so, go on
                warnings.warn(f"{self.out}: cannot remove {entry}, a temporary left by an interrupted fastmerge "
                              f"run (pid {pid}): {e.strerror or e}", stacklevel=3)
                continue
            warnings.warn(f"{self.out}: removed {entry}, a temporary left by an interrupted fastmerge run "
                          f"(pid {pid})", stacklevel=3)

    # -- the commit

    def commit(self, tmp: Path | None = None) -> Path:
        """Move the finished temporary into place: never over an existing output without ``force``
        (checked now, not only at the start); with it, swap atomically and remove the old one."""
        tmp = tmp or self.tmp
        if tmp is None or self._fd is None:
            raise RuntimeError("commit outside an entered OutputClaim")
        dst = self.parent / self.name
        check_target(self.out, self.protected, self.label)
        with _signals_deferred():
            err = _renameat2(tmp, dst, _RENAME_NOREPLACE)
            if err == errno.EEXIST:
                if not self.force:
                    raise FastmergeError(f"{self.out}: output appeared while this run was writing it; "
                                         "pass --force to replace it")
                err = _renameat2(tmp, dst, _RENAME_EXCHANGE)  # tmp now holds the old output
                if err == 0:
                    remove_path(tmp)
                    self.tmp = None
                    return self.out
            if err == 0:
                self.tmp = None
                return self.out
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise FastmergeError(f"{self.out}: cannot move the finished output into place ({os.strerror(err)})")
            self._commit_plain(tmp, dst)
        return self.out

    def _commit_plain(self, tmp: Path, dst: Path) -> None:
        """The commit on a filesystem without renameat2 flags: two renames (signals wait meanwhile)."""
        if os.path.lexists(dst):
            if not self.force:
                raise FastmergeError(f"{self.out}: output appeared while this run was writing it; "
                                     "pass --force to replace it")
            old = dst.parent / f".{self.name}.fastmerge-old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            self.tmp = old  # removed on leaving
        else:
            os.rename(tmp, dst)  # a directory appearing just now makes this fail rather than be replaced
            self.tmp = None


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote into its lock file (it writes it right after locking)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None
