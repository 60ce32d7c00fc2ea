"""Run a slow engine call in a worker thread and hand its progress out as events."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kedit.engine import events as ev

T = TypeVar("T")
ProgressFn = Callable[[str, int, int], None]


class _Done:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


def with_progress(work: Callable[[ProgressFn], T], result: list[T]) -> Iterator[ev.Progress]:
    """Yield Progress events while ``work(progress)`` runs; its return value lands in ``result``.

    An exception raised by ``work`` is re-raised here, in the consumer's thread.
    """
    q: queue.Queue[ev.Progress | _Done] = queue.Queue()

    def progress(label: str, done: int, total: int) -> None:
        q.put(ev.Progress(label, done, total))

    def run() -> None:
        try:
            q.put(_Done(work(progress)))
        except BaseException as exc:  # handed to the consumer below
            q.put(_Done(error=exc))

    worker = threading.Thread(target=run, name="kedit-work", daemon=True)
    worker.start()
    while True:
        item = q.get()
        if isinstance(item, _Done):
            worker.join()
            if item.error is not None:
                raise item.error
            result.append(item.value)
            return
        yield item
