"""Token-by-token text streaming out of ``generate()`` running in another thread."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

from transformers.generation.streamers import BaseStreamer

_END = object()


class TokenStreamer(BaseStreamer):
    """Hands out the new text of every generated token through a queue.

    transformers' TextIteratorStreamer waits for a space before it lets text go, so a
    reply without spaces would arrive all at once; this one decodes the whole reply
    after each token and passes on what is new, holding back only an unfinished
    multi-byte character.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.ids: list[int] = []
        self.text = ""
        self._prompt_skipped = False

    def put(self, value: Any) -> None:
        if not self._prompt_skipped:  # generate() first sends the prompt
            self._prompt_skipped = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)
        self.queue.put(_END)

    def abort(self) -> None:
        """End the stream from outside generate() (after it failed)."""
        self.queue.put(_END)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        keep = 0
        while keep < min(len(text), len(self.text)) and text[keep] == self.text[keep]:
            keep += 1
        new = text[keep:] if keep == len(self.text) else text[len(self.text) :]
        self.text = text
        if new:
            self.queue.put(new)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            yield item
