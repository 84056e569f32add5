"""The two consoles (results on stdout, progress and messages on stderr) and a progress bar for stage loops."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

out = Console(soft_wrap=True)
log = Console(stderr=True, soft_wrap=True)

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A transient progress bar on stderr when it is a terminal; silent otherwise (logs stay clean)."""
    yield from track(items, description=description, total=total, console=log, transient=True,
                     disable=not log.is_terminal or log.quiet)
