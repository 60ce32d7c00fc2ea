"""How responsive the Textual app stays while a reply streams: `kedit bench tui`.

Two figures, each measured idle and during generation in the same run:
- event-loop lag: how late a 5 ms timer on the UI's loop fires (a frame can be no earlier);
- keystroke echo: from a key event posted to the chat input to its text showing the key.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from textual import events

from kedit.tui.app import ChatInput, KeditApp

TICK_S = 0.005


@dataclass
class Responsiveness:
    label: str
    lag_ms: list[float]
    echo_ms: list[float]

    def summary(self) -> dict[str, float]:
        def stats(xs: list[float]) -> dict[str, float]:
            xs = sorted(xs) or [float("nan")]
            return {"median": statistics.median(xs), "p95": xs[int(0.95 * (len(xs) - 1))], "max": xs[-1]}

        return {
            **{f"lag_{k}_ms": v for k, v in stats(self.lag_ms).items()},
            **{f"echo_{k}_ms": v for k, v in stats(self.echo_ms).items()},
            "samples": float(len(self.echo_ms)),
        }


async def _measure(app: KeditApp, box: ChatInput, until) -> Responsiveness:
    lag: list[float] = []
    echo: list[float] = []

    async def ticks() -> None:
        while not until():
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lag.append((time.perf_counter() - t - TICK_S) * 1000)

    ticker = asyncio.create_task(ticks())
    while not until():
        before = len(box.text)
        t = time.perf_counter()
        box.post_message(events.Key("x", "x"))
        while len(box.text) == before and not until():
            await asyncio.sleep(0)
        if len(box.text) > before:
            echo.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.02)
    await ticker
    return Responsiveness("", lag, echo)


async def measure(session, prompt: str, idle_s: float = 2.0) -> tuple[Responsiveness, Responsiveness, dict]:
    """(idle, while generating, what was generated)."""
    app = KeditApp(session=session, history_file=None)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        box = app.query_one(ChatInput)
        box.focus()
        end = time.monotonic() + idle_s
        idle = await _measure(app, box, lambda: time.monotonic() > end)
        idle.label = "idle"
        box.text = ""
        started = time.perf_counter()
        app.submit(prompt)
        while not session.generating:
            await asyncio.sleep(0.001)
        busy = await _measure(app, box, lambda: not session.generating)
        busy.label = "while generating"
        seconds = time.perf_counter() - started
        await app.workers.wait_for_complete()
        await pilot.pause()
        tokens = session.last_token_count
    return idle, busy, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
