"""Micro-batching for the API: concurrent requests to one worker share one forward pass.

Request threads decode and preprocess their own images in parallel (a bad image fails there, in its own
request, and never joins a batch); they hand the prepared tensors to :class:`MicroBatcher` and wait. One
scoring thread takes the first waiting item, gathers more for at most ``wait_ms`` milliseconds (and only
while other requests are still decoding, so a lone request never waits) up to ``max_batch`` items, and
scores them in one forward. With ``wait_ms=0`` every image is scored on its own forward, as before.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from .detector import Prediction


class MicroBatcher:
    """Gathers prepared items from many threads into batches for ``score`` (one call at a time)."""

    def __init__(self, score: Callable[[Sequence[Any]], list[Prediction]], *, max_batch: int, wait_ms: float) -> None:
        self.score, self.max_batch, self.wait = score, max(1, int(max_batch)), max(0.0, wait_ms) / 1000.0
        self._queue: "queue.Queue[tuple[Any, Future]]" = queue.Queue()
        self._decoding = 0
        self._lock = threading.Lock()
        self.batches: list[int] = []  #: sizes of recent batches (bounded), for tests and /model
        threading.Thread(target=self._run, name="dfx-microbatch", daemon=True).start()

    def decoding(self, delta: int) -> None:
        """Count requests that are still decoding: the batcher waits for them only while there are some."""
        with self._lock:
            self._decoding += delta

    def submit(self, items: Sequence[Any]) -> list[Prediction]:
        """Score one request's ``items`` (prepared images), together with other requests' when micro-batching;
        blocks until they are scored. An error of the forward pass is raised in every request of that batch."""
        f: Future = Future()
        self._queue.put((list(items), f))
        return f.result()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            size = len(batch[0][0])
            deadline = time.monotonic() + self.wait
            while self.wait > 0 and size < self.max_batch:  # 0 ms: each request alone, as before
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    with self._lock:
                        others = self._decoding
                    if left <= 0 or others <= 0:
                        break
                    try:
                        entry = self._queue.get(timeout=min(left, 0.001))
                    except queue.Empty:
                        continue
                batch.append(entry)
                size += len(entry[0])
            self.batches = (self.batches + [size])[-1000:]
            try:
                results = self.score([item for items, _ in batch for item in items])
            except BaseException as exc:  # the model failed: every request of this batch gets the error
                for _, f in batch:
                    f.set_exception(exc)
                continue
            start = 0
            for items, f in batch:
                f.set_result(results[start:start + len(items)])
                start += len(items)
