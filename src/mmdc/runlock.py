"""One owner per run folder: a command that writes into a run folder (``run``,
``calibrate``, ``demo``, ``align``, ``report``, ``eval`` and ``export`` with their output
inside it) holds it for as long as it runs, and a second one is refused at once, in one
line naming the folder and the process that holds it, before it touches anything.

The hold is an exclusive ``flock`` on ``RUN_DIR/.mmdc.lock``, which the kernel drops when
its process ends however it ends (SIGKILL, a crash, power loss): a stale hold needs no
clean-up, the next command takes it over. The file says who holds it (command, pid,
host, since when) for the refusal's message, and is removed when its holder lets go.
Under several processes rank 0 holds it for all and tells the others the outcome.
(``flock`` works on local file systems and on NFS v4; on a file system without locks the
hold is not taken and a warning says so.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from mmdc.errors import MmdcError

log = logging.getLogger(__name__)

LOCK_NAME = ".mmdc.lock"


class RunFolderBusy(MmdcError):
    """Another process holds the run folder."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"'{info['command']}' (pid {info['pid']} on {info['host']}, since "
                f"{info['since']})")
    except (ValueError, KeyError, TypeError, OSError):
        return "another mmdc process (which one it has not written yet)"


def acquire(run_dir: Path, command: str) -> int | None:
    """Take the run folder's hold; returns the lock's file descriptor (None where the file
    system has no locks). Raises :class:`RunFolderBusy` when another process holds it."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusy(f"{run_dir}: in use by {holder}; a run folder has one owner "
                                f"at a time: wait for it to end, or use another run_dir") from None
        except OSError as exc:  # no locks on this file system: go on unguarded
            os.close(fd)
            log.warning("%s: cannot lock the run folder (%s); nothing stops a second command "
                        "from writing into it meanwhile", run_dir, exc.strerror or exc)
            return None
        try:  # the holder before us may have removed the file between our open and lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def release(run_dir: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(Path(run_dir) / LOCK_NAME)  # while still held: no one else has it now
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def hold(run_dir: str | Path, command: str):
    """Hold ``run_dir`` (created if need be) while the block runs; every rank calls it."""
    from mmdc import distributed
    from mmdc.data.pool import ensure_dir

    fd, error = None, None
    created = not Path(run_dir).exists()  # removed again if nothing is written there
    if distributed.is_main():
        try:
            run_dir = ensure_dir(run_dir, "run_dir")
            fd = acquire(run_dir, command)
        except MmdcError as exc:
            error = exc
    refused = distributed.broadcast(str(error) if error else None)
    if error is not None:
        raise error
    if refused:  # the other ranks stop with rank 0's reason
        raise MmdcError(refused)
    try:
        yield Path(run_dir)
    finally:
        if distributed.is_main():
            release(Path(run_dir), fd)
            if created and fd is not None and not any(Path(run_dir).iterdir()):
                Path(run_dir).rmdir()  # a command refused at start-up leaves no folder
