"""
Progress on long work: tqdm's bar on a terminal; where the output goes to a file (a batch job's
log, `python demo.py > log 2>&1`), no carriage-return frames but a plain line every 30 seconds
and at the end: how far, how fast, how long is left. Not the method.
"""

import os
import sys
import time
from datetime import timedelta

from tqdm import tqdm

INTERVAL = 30  # seconds between two plain lines in a log


def on_terminal():  # both streams: a bar redraws itself on one and writes frames into the other
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(iterable=None, desc="", total=None, initial=0, disable=False, **kwargs):
    """tqdm(iterable, desc, ...) on a terminal, LogLines in a log; shown by rank 0 alone (or a
    plain python process)."""
    disable = disable or os.environ.get("RANK", "0") != "0"
    if disable or on_terminal():
        return tqdm(iterable, desc, total=total, initial=initial, disable=disable, **kwargs)
    return LogLines(iterable, desc, total, initial)


class LogLines:
    """What a bar tells, as plain lines on stderr: 'train: 120/40000, 5.20/s, 2:07:33 left'. The
    part of tqdm's interface the scripts use: iterate, update(n), close()."""

    def __init__(self, iterable=None, desc="", total=None, initial=0):
        self.iterable = iterable
        self.desc = desc
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = initial
        self.first = initial  # the rate counts this process's own work
        self.started = time.monotonic()
        self.last_line = self.started
        self.shown = None  # the count the last line showed

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= INTERVAL:
            self.line(now)

    def line(self, now):
        self.last_line = now
        self.shown = self.n
        rate = (self.n - self.first) / max(now - self.started, 1e-9)
        left = ""
        if self.total and rate > 0:
            left = f", {timedelta(seconds=round((self.total - self.n) / rate))} left"
        print(f"{self.desc}: {self.n}/{self.total or '?'}, {rate:.2f}/s{left}", file=sys.stderr,
              flush=True)

    def close(self):  # the last line, unless the one before showed the same count
        if self.shown != self.n:
            self.line(time.monotonic())
