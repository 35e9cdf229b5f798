"""The cache folder: one lock for every write into it, stale temporaries removed, unwritable folders tolerated.

Every file we write into the cache folder (the decoded data, the verified-decode pointer, downloaded zips) is
written while holding ``omniglot28.lock`` there. That gives two guarantees:

* Concurrent commands decode (or download) once: the second waits for the lock, then finds the first's file.
* A temporary file of ours that exists while we hold the lock has no live writer (a writer would hold the
  lock), so it was left by a killed process and can be removed, whatever its age and whichever host wrote it.

The lock is an OS file lock (``filelock``): the kernel releases it when its holder dies, so it never goes stale.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from benchmark.harness.atomic import remove_temporaries

#: Lock file in the cache folder.
LOCK_NAME = "omniglot28.lock"

#: Our files in the cache folder start with this (their temporaries: ``.omniglot28-*.tmp``).
OUR_PREFIX = "omniglot28-"

#: Wait this long for the lock silently; longer waits get one line on stderr, so a pause is never a mystery.
QUIET_WAIT_SECONDS = 0.5

Warn = Callable[[str], None]


def warn_on_stderr(message: str) -> None:
    """Print one line on stderr (looked up at call time, so tests' capsys sees it)."""
    print(message, file=sys.stderr)


@contextmanager
def cache_lock(root: Path, warn: Warn = warn_on_stderr, *, wait: bool = True) -> Iterator[None]:
    """Hold ``root``'s lock, creating the folder, and remove stale temporaries once it is held.

    Raises:
        OSError: the folder or its lock file cannot be created.
        filelock.Timeout: ``wait`` is false and another process holds the lock.
    """
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_NAME))
    try:
        lock.acquire(timeout=QUIET_WAIT_SECONDS if wait else 0)
    except Timeout:
        if not wait:
            raise
        warn(f"note: waiting for another bench process that is writing the Omniglot cache in {root}")
        lock.acquire()
    try:
        remove_temporaries(root, OUR_PREFIX)
        yield
    finally:
        lock.release()


class CacheDir:
    """Writes into the cache folder that degrade to one warning when the folder cannot be written.

    The data is in memory by the time we write it, so a full, read-only or misplaced cache folder costs the
    next command a decode, not this one its result.
    """

    def __init__(self, root: Path, warn: Warn = warn_on_stderr):
        self.root = root
        self.warn = warn
        self.writable = True

    def tidy(self) -> None:
        """Remove temporaries that killed commands left, unless another process holds the lock right now
        (it may be writing one of them; the next command cleans up instead)."""
        from filelock import Timeout

        if not self.root.is_dir():
            return
        try:
            with cache_lock(self.root, self.warn, wait=False):
                pass
        except (Timeout, OSError):
            pass  # busy, or not ours to write: writes report an unwritable folder when they happen

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock while the body writes; without it (after one warning) when the folder is unusable."""
        with ExitStack() as stack:
            if self.writable:
                try:
                    stack.enter_context(cache_lock(self.root, self.warn))
                except OSError as exc:
                    self._cannot_write(exc)
            yield

    def write(self, save: Callable[[], None]) -> bool:
        """Run ``save`` (an atomic write into the folder); on OSError warn once and go on. True if it wrote."""
        if not self.writable:
            return False
        try:
            save()
        except OSError as exc:
            self._cannot_write(exc)
            return False
        return True

    def _cannot_write(self, exc: OSError) -> None:
        if self.writable:
            self.writable = False
            self.warn(
                f"warning: cannot write the Omniglot cache in {self.root} ({why_unwritable(self.root, exc)}); going "
                "on with the data in memory: set BENCH_CACHE_DIR to a writable folder so that the next command "
                "need not decode again"
            )


def why_unwritable(root: Path, exc: OSError) -> str:
    """A short reason: the file in the way when the folder or one above it is a file (mkdir's own message
    names the folder it wanted, which misleads), else the OS's words (no space left, read-only, permission)."""
    blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    return exc.strerror or str(exc)
