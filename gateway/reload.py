"""Hot reload: re-read the config file on change, SIGHUP or ``POST /admin/reload``.

A Kubernetes ConfigMap update swaps the ``..data`` symlink of the mounted
directory; the file's own mtime does not change, so the watcher compares a hash of
the content read through the path instead, and acts on a content once two successive
checks read it (a file rewritten in place is, for a moment, a prefix of itself that may
be a valid config without a guard).  An invalid config keeps the last good one; a valid
one is applied atomically (see :meth:`Runtime.apply`).

Only a regular file of at most 1 MiB is read, opened without blocking
(:func:`~gateway.config.read_config_bytes`): a path swapped for a FIFO, a device or a
symlink loop is a failed reload, reported once, and never holds the watcher thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import ConfigError, load_file, read_config_bytes
from gateway.identity.resolver import identity_files
from gateway.tasks import stop_task

if TYPE_CHECKING:
    from gateway.runtime import Runtime


class Reloader:
    """Owns the reload triggers and serialises reloads."""

    def __init__(self, runtime: Runtime, path: str | None) -> None:
        self.rt = runtime
        self.path = Path(path) if path else None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._seen = runtime.settings.digest  # last content the watcher acted on
        self._files_seen: str | None = None  # the same for the identity files (SPEC 11)

    async def start(self) -> None:
        if self.path is not None:
            self._task = asyncio.create_task(self._watch(), name="config-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    def _digest(self) -> str:
        """A hash of the content, or the read error: a new error is a change too, so a
        path that turns into a FIFO or a directory is reported (once) as a failed reload."""
        assert self.path is not None  # noqa: S101 - only called when watching a file
        try:
            return hashlib.sha256(read_config_bytes(self.path)).hexdigest()
        except ConfigError as exc:
            return "unreadable: " + "; ".join(str(p) for p in exc.problems)

    def _files_digest(self) -> str:
        """A hash of the identity files the current config names (JWKS, API keys), each
        read as the config is (a missing or unreadable one hashes its error)."""
        h = hashlib.sha256()
        for path in identity_files(self.rt.settings.config):
            h.update(path.encode() + b"\0")
            try:
                h.update(hashlib.sha256(read_config_bytes(Path(path))).digest())
            except ConfigError as exc:
                h.update(("unreadable: " + "; ".join(map(str, exc.problems))).encode())
        return h.hexdigest()

    async def _watch(self) -> None:
        # a content is acted on once two successive checks read it: a file rewritten in
        # place is a prefix of itself for a moment, and a prefix can be a valid config
        # that lacks a guard (a route's source_cidrs on a line not yet written)
        pending: str | None = None
        files_pending: str | None = None
        if self._files_seen is None:
            self._files_seen = await asyncio.to_thread(self._files_digest)
        while True:
            await asyncio.sleep(self.rt.settings.config.reload.interval_s)
            # the identity files are re-read like the config: a change (read twice) reloads
            files = await asyncio.to_thread(self._files_digest)
            if files != self._files_seen:
                if files == files_pending:
                    files_pending = None
                    self._files_seen = files  # a bad file is reported once
                    await self.reload("identity_file_change")
                else:
                    files_pending = files
            digest = await asyncio.to_thread(self._digest)
            if digest == self._seen or digest != pending:
                pending = digest if digest != self._seen else None
                continue
            pending = None
            self._seen = digest  # a bad file is reported once, not every tick
            await self.reload("file_change", expect=digest)

    async def reload(self, trigger: str, expect: str | None = None) -> tuple[bool, list[str]]:
        """Re-read and apply the config; return (applied, errors). ``expect``: the digest
        the watcher saw twice; a content read now that differs is left to its next check."""
        rt = self.rt
        if self.path is None:
            return False, ["the gateway runs on built-in defaults: there is no file to reload"]
        async with self._lock:
            # read before the load: a file changed during it is seen changed again
            files = await asyncio.to_thread(self._files_digest)
            try:
                settings = await asyncio.to_thread(load_file, self.path)
            except Exception as exc:  # whatever the file holds, a failed reload
                if isinstance(exc, ConfigError):
                    errors = [str(p) for p in exc.problems]
                else:  # a bug of ours: still a failed reload, and the watcher lives on
                    errors = [f"internal error: {type(exc).__name__}: {exc}"]
                rt.metrics.config_reloads.labels("failure").inc()
                rt.metrics.config_last_reload_successful.set(0)
                rt.last_reload = ("failure", time.time(), errors[0] if errors else None)
                rt.log.error(  # noqa: TRY400 - the errors are listed, a traceback adds nothing
                    "config_reload_failed", trigger=trigger, path=str(self.path), errors=errors
                )
                return False, errors
            if expect is not None and settings.digest != expect:
                self._seen = ""  # changed again since: the next checks decide
                return False, ["the file changed while it was read"]
            self._seen = settings.digest
            self._files_seen = files
            needs_restart = rt.apply(settings)
            rt.metrics.config_reloads.labels("success").inc()
            rt.metrics.config_last_reload_successful.set(1)
            rt.metrics.config_last_reload_success.set(time.time())
            rt.last_reload = ("success", time.time(), None)
            rt.log.info(
                "config_reloaded",
                trigger=trigger,
                path=str(self.path),
                digest=settings.digest[:12],
                warnings=[str(w) for w in settings.warnings],
            )
            if needs_restart:
                rt.log.warning(
                    "config_change_needs_restart",
                    fields=needs_restart,
                    detail="these settings keep their old values until the gateway restarts",
                )
            return True, []
