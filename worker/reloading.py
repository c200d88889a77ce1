"""Reloading, in one place: what a worker re-reads, and when.

Every reloadable part of the context (accounts: the users file; TLS: certificate and key; XTND:
the authorization file) has ``paths()`` and ``reload(why)``. The supervisor's RELOAD frame
(SIGHUP) reloads them all; a watchdog observer on each file's *directory* (editors replace a
file by rename) reloads the part whose file changed, once the burst of events is quiet. A part
that fails to load keeps what it had and logs an ERROR.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import gevent
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from shared.logsetup import log

DEBOUNCE_SECONDS = 0.3  # an editor's save is a burst of events; reload once it is quiet


class Reloadable(Protocol):
    def paths(self) -> tuple[str, ...]: ...

    def reload(self, why: str) -> bool: ...


class Reloader:
    def __init__(self, parts: Sequence[Reloadable]):
        self.parts = tuple(parts)
        self.observer: Observer | None = None
        self._due: dict[int, float] = {}  # part index -> when its quiet period ends
        self._waiters: dict[int, gevent.Greenlet] = {}

    def reload_all(self, why: str) -> None:
        """The RELOAD frame (SIGHUP to the supervisor): every part re-reads its files."""
        for part in self.parts:
            part.reload(why)

    def watch(self) -> None:
        """Start watching the directories of every part's files (watchdog's own thread)."""
        by_directory: dict[str, dict[str, list[int]]] = {}
        for index, part in enumerate(self.parts):
            for path in part.paths():
                directory = os.path.dirname(os.path.abspath(path))
                names = by_directory.setdefault(directory, {})
                names.setdefault(os.path.basename(path), []).append(index)
        if not by_directory:
            return
        hub = gevent.get_hub()
        self.observer = Observer()
        self.observer.daemon = True
        for directory, names in by_directory.items():
            def poke(index: int) -> None:
                hub.loop.run_callback_threadsafe(self._changed, index)
            try:
                self.observer.schedule(_FileEvents(names, poke), directory, recursive=False)
            except OSError as exc:  # a directory gone since startup: SIGHUP still works
                log.error("cannot watch %s for changes: %s", directory, exc)
        try:
            self.observer.start()
        except OSError as exc:  # inotify instances or watches used up: SIGHUP still works
            log.error("cannot watch files for changes (%s); reload with SIGHUP", exc)
            self.observer = None

    def _changed(self, index: int) -> None:
        # In the event loop now (run_callback_threadsafe); restart the quiet period.
        self._due[index] = time.monotonic() + DEBOUNCE_SECONDS
        if index not in self._waiters:
            self._waiters[index] = gevent.spawn(self._reload_when_quiet, index)

    def _reload_when_quiet(self, index: int) -> None:
        try:
            while (left := self._due[index] - time.monotonic()) > 0:
                gevent.sleep(left)
            self.parts[index].reload("file changed")
        finally:
            self._waiters.pop(index, None)

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None


class _FileEvents(FileSystemEventHandler):
    """Runs on watchdog's thread: only filters and pokes the event loop, never reloads here."""

    IGNORED = frozenset({"opened", "closed_no_write"})  # our own reads are not changes

    def __init__(self, names: dict[str, list[int]], poke: Callable[[int], None]):
        super().__init__()
        self.names = names
        self.poke = poke

    def on_any_event(self, event) -> None:
        if event.is_directory or event.event_type in self.IGNORED:
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        hit: set[int] = set()
        for path in paths:
            if path:
                hit.update(self.names.get(os.path.basename(os.fsdecode(path)), ()))
        for index in hit:
            self.poke(index)
