"""The worker's model: one Detector per process, loaded in the background, behind a micro-batcher."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import current_app

from ..detector import Detector, Prediction
from .config import ApiConfig, ApiError

log = logging.getLogger("dfx.api")


class ModelWorker:
    """The worker's Detector, loaded in the background; ``state`` is loading, ready or failed."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.detector: Detector | None = None
        self.state = "loading"
        self.wait_ms = 0.0  #: the micro-batching wait in effect (set at load: the default depends on the device)
        self.error: str | None = None
        self.forward_lock = threading.Lock()
        self.finder_lock = threading.Lock()
        self.finder: Any = None
        self.provenance: Any = None  #: the ProvenanceReader (the operator's trust anchors), set at load
        threading.Thread(target=self._load, name="dfx-load-model", daemon=True).start()

    def _load(self) -> None:
        try:
            import torch

            from ..weights import resolve_weights

            if self.config.torch_threads:
                torch.set_num_threads(self.config.torch_threads)
            from ..provenance import ProvenanceReader, load_anchors

            self.provenance = ProvenanceReader(load_anchors(self.config.trust_anchors))
            self.detector = Detector(resolve_weights(self.config.weights), device=self.config.device,
                                     batch_size=self.config.batch_size, max_pixels=self.config.max_pixels,
                                     provenance_rule=self.config.provenance_rule)
            from ..microbatch import MicroBatcher

            det, sizes = self.detector, max(self.config.batch_size, self.config.max_batch)
            cuda = det.device.type == "cuda"
            self.wait_ms = self.config.batch_wait_ms if self.config.batch_wait_ms is not None else 5.0 if cuda else 0.0
            self.batcher = MicroBatcher(self._forward, max_batch=self.config.batch_size, wait_ms=self.wait_ms,
                                        warm_up=(lambda: det.warm_up(sizes)) if det.device.type == "cuda" else None)
            self.state = "ready"
            log.info("model ready: %s on %s", self.detector.model_id, self.detector.device)
        except Exception as exc:  # the detail (paths, internals) goes to the log only, never to a client
            self.error = type(exc).__name__
            self.state = "failed"
            log.error("model failed to load: %s: %s", type(exc).__name__, exc)

    def face_finder(self) -> Any:
        """The face finder, built on first use (one per worker process): the bundle's own when it has experts that
        read faces, else MTCNN (Haar when MTCNN is not installed)."""
        with self.finder_lock:
            if self.finder is None:
                self.finder = self.require().face_finder()
            return self.finder

    def _forward(self, items: list) -> list[Prediction]:
        with self.forward_lock:
            assert self.detector is not None
            return self.detector.score_prepared(items)

    def require(self) -> Detector:
        if self.state == "ready" and self.detector is not None:
            return self.detector
        if self.state == "loading":
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly")
        raise ApiError(503, "model_unavailable", "the model could not be loaded; the server's log says why")

    def wait(self, timeout: float = 300) -> bool:
        """Block until loaded or failed (for tools and tests); True when ready."""
        end = time.monotonic() + timeout
        while self.state == "loading" and time.monotonic() < end:
            time.sleep(0.05)
        return self.state == "ready"


def current() -> tuple[ModelWorker, ApiConfig]:
    """The model worker and the settings of the app handling this request."""
    return current_app.extensions["dfx_model"], current_app.extensions["dfx_config"]
