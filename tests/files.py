"""Config paths that are not a readable config file (a regular file of at most 1 MiB, of
UTF-8 YAML the parser can nest), for load and reload tests."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

ONE_MIB = 1 << 20

# kind -> a fragment of the error message the load reports
NOT_A_CONFIG = {
    "fifo": "not a regular file (a FIFO)",
    "symlink-to-fifo": "not a regular file (a FIFO)",
    "dev-zero": "not a regular file (a character device)",
    "dev-urandom": "not a regular file (a character device)",
    "directory": "not a regular file (a directory)",
    "unix-socket": "cannot read",
    "symlink-loop": "cannot read",
    "dangling-symlink": "cannot read",
    "huge": "larger than 1 MiB",
    "huge-sparse": "larger than 1 MiB",
    "not-utf8": "not UTF-8",
    "deep-nesting": "nested too deeply",
}


def make_not_a_config(kind: str, where: Path) -> Path:
    """Create, under the directory ``where``, a path of the given kind; return it."""
    path = where / f"{kind}.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(where / "pipe")
        path.symlink_to(where / "pipe")
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dev-urandom":
        path.symlink_to("/dev/urandom")
    elif kind == "directory":
        path.mkdir()
    elif kind == "unix-socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # the socket file stays after the socket is closed
    elif kind == "symlink-loop":
        path.symlink_to(where / "loop-b")
        (where / "loop-b").symlink_to(path)
    elif kind == "dangling-symlink":
        path.symlink_to(where / "absent")
    elif kind == "huge":
        path.write_bytes(b"#" * ONE_MIB + b"\n")  # valid YAML: one comment line
    elif kind == "huge-sparse":
        with path.open("wb") as f:
            f.truncate(1 << 30)
    elif kind == "not-utf8":
        path.write_bytes(b"listen: {host: \xff\xfe}\n")
    elif kind == "deep-nesting":  # small, but deeper than the parser's recursion allows
        path.write_text("listen: " + "[" * 50_000 + "\n")
    else:
        raise ValueError(kind)
    return path


def unblock_fifos(where: Path) -> None:
    """Open every FIFO under ``where`` for writing once: a reader blocked on one (the
    code under test, before its fix) sees end of file instead of hanging the test run."""
    for p in where.iterdir():
        if p.is_fifo():
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
