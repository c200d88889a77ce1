"""The midnight clock of the log file: the supervisor starts a new file every day.

Just after local midnight (the supervisor's loop asks ``due`` every turn, at least once a second)
the file is renamed to ``NAME.YYYY-MM-DD``, the day it holds, and the supervisor reopens its own
handler and tells every worker to reopen theirs. Only the supervisor uses this module.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable

from shared import logsetup

MAX_SAME_DAY = 100  # NAME.DAY.1 ... when a file of that day already exists (clock set back)


class MidnightRotation:
    """When the day of ``clock`` advances, the current file gets that day's name."""

    def __init__(self, path: str, clock: Callable[[], float] = logsetup.clock):
        self.path = path
        self.clock = clock
        self.day = self.today()

    def today(self) -> datetime.date:
        return datetime.date.fromtimestamp(self.clock())

    def left_from_before(self) -> datetime.date | None:
        """The day of a non-empty file last written before today (a server stopped overnight)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        if not info.st_size:
            return None
        shift = self.clock() - time.time()  # the test hook shifts file times alike
        day = datetime.date.fromtimestamp(info.st_mtime + shift)
        return day if day < self.today() else None

    def due(self) -> bool:
        today = self.today()
        if today < self.day:
            self.day = today  # the clock went back: this file now belongs to the earlier day
        return today > self.day

    def rotate(self, day: datetime.date | None = None) -> str:
        """Rename the file to its day's name (``day`` or the current one); returns the new name.

        The day moves on first, so a rename that fails is tried again tomorrow, not every second.
        """
        day = day or self.day
        self.day = self.today()
        target = self.name_for(day)
        os.rename(self.path, target)
        return target

    def name_for(self, day: datetime.date) -> str:
        base = f"{self.path}.{day.isoformat()}"
        for n in range(MAX_SAME_DAY):
            target = base if not n else f"{base}.{n}"
            if not os.path.exists(target):
                return target
        raise FileExistsError(f"{base}.1 to .{MAX_SAME_DAY - 1} all exist")
