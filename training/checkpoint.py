"""Keeping a run safe: the metrics log (an Accelerate tracker), the rolling checkpoint, and an expert's final
folder, each written so that a killed run resumes or finds the folder whole."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process


class CSVTracker(GeneralTracker):
    """An Accelerate tracker writing ``time,step,key,value`` rows to ``<run>/logs/metrics.csv``."""

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_dir: str) -> None:
        # Nothing is written here: every process builds the tracker, and only the main one may touch the run
        # folder (it decides first whether the folder is free; see train()).
        super().__init__()
        self.path = Path(run_dir) / "logs" / "metrics.csv"

    def _ensure(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("time,step,key,value\n")

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self._ensure()
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._ensure()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            now = f"{time.time():.3f}"
            for k, v in values.items():
                w.writerow([now, "" if step is None else step, k, v])


def save_checkpoint(accelerator, ckpt: Path, ema, progress: dict[str, Any]) -> None:
    """Accelerate state + EMA + progress into ``ckpt.tmp``, then swapped in by renames."""
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        (tmp / "progress.json").write_text(json.dumps(progress))
        old = ckpt.with_name(ckpt.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
