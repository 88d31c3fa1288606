"""Micro-batching for the API: concurrent requests to one worker share one forward pass.

Request threads decode and preprocess their own images in parallel (a bad image fails there, in its own
request, and never joins a batch); they hand the prepared tensors to :class:`MicroBatcher` and wait. One
scoring thread takes the first waiting item, gathers more for at most ``wait_ms`` milliseconds (and only
while other requests are still decoding, so a lone request never waits) up to ``max_batch`` items, and
scores them in one forward. With ``wait_ms=0`` every image is scored on its own forward, as before.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from .detector import Prediction


class MicroBatcher:
    """Gathers prepared items from many threads into batches for ``score`` (one call at a time)."""

    def __init__(self, score: Callable[[Sequence[Any]], list[Prediction]], *, max_batch: int, wait_ms: float,
                 warm_up: Callable[[], None] | None = None) -> None:
        """``warm_up`` runs in the scoring thread before it takes requests, and the constructor waits for it:
        PyTorch keeps cuDNN's execution plans per thread, so a warm-up run in any other thread leaves the
        scoring thread to pay each batch shape's plan (about a second on an H100) on its first request."""
        self.score, self.max_batch, self.wait = score, max(1, int(max_batch)), max(0.0, wait_ms) / 1000.0
        self._queue: "queue.Queue[tuple[Any, Future, float]]" = queue.Queue()
        self._decoding = 0
        self._lock = threading.Lock()
        self.total = 0  #: batches scored since start
        #: recent batches (bounded): (images, ms the oldest request queued, ms the forward took), for /model;
        #: queue time against forward time tells a slow model from a starved scoring thread
        self.recent: "deque[tuple[int, float, float]]" = deque(maxlen=1000)
        started: Future = Future()
        threading.Thread(target=self._run, args=(warm_up, started), name="dfx-microbatch", daemon=True).start()
        started.result()  # re-raises a failed warm-up here, in the loading thread

    def decoding(self, delta: int) -> None:
        """Count requests that are still decoding: the batcher waits for them only while there are some."""
        with self._lock:
            self._decoding += delta

    def submit(self, items: Sequence[Any]) -> list[Prediction]:
        """Score one request's ``items`` (prepared images), together with other requests' when micro-batching;
        blocks until they are scored. An error of the forward pass is raised in every request of that batch."""
        f: Future = Future()
        self._queue.put((list(items), f, time.perf_counter()))
        return f.result()

    def summary(self, last: int | None = None) -> dict[str, Any]:
        """Sizes and timings of the ``last`` recent batches (all kept ones by default): how full the batches
        were, how long the oldest request of a batch waited for the scoring thread, how long forwards took."""
        rows = list(self.recent)
        rows = rows[-last:] if last and last > 0 else rows
        sizes, queued, forward = ([r[i] for r in rows] for i in range(3))

        def pct(xs: list[float], q: float) -> float:
            return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 2) if len(xs) > 1 else \
                round(xs[0], 2) if xs else 0.0

        return {"batches": self.total, "recent_batches": len(rows), "largest_recent_batch": max(sizes, default=0),
                "mean_recent_batch": round(sum(sizes) / len(sizes), 3) if sizes else 0,
                "queue_ms_p50": pct(queued, 50), "queue_ms_p95": pct(queued, 95),
                "forward_ms_p50": pct(forward, 50), "forward_ms_p95": pct(forward, 95)}

    def _run(self, warm_up: Callable[[], None] | None, started: Future) -> None:
        try:
            if warm_up is not None:
                warm_up()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
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
            started = time.perf_counter()
            try:
                results = self.score([item for items, _, _ in batch for item in items])
            except BaseException as exc:  # the model failed: every request of this batch gets the error
                for _, f, _ in batch:
                    f.set_exception(exc)
                continue
            finally:
                self.total += 1
                self.recent.append((size, (started - batch[0][2]) * 1000, (time.perf_counter() - started) * 1000))
            start = 0
            for items, f, _ in batch:
                f.set_result(results[start:start + len(items)])
                start += len(items)
