"""Scoring that survives kills and spreads over processes: shards of rows, appended as they are scored.

``dfx predict`` / ``dfx submit`` with ``-o OUT`` write each scored batch to ``OUT.parts/rank-NNNNN.jsonl``
(appended and flushed, so a killed run loses at most the batch in flight); ``--resume`` skips every file
that any shard already holds; when every process is done, the main one merges the shards into ``OUT`` in
the usual order (atomically) and removes the parts.

Several processes: started by ``torchrun --nproc_per_node N`` or ``accelerate launch`` (one per GPU, or
across machines), each reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment the launcher
sets, takes every N-th file, scores it on its own device (``cuda:LOCAL_RANK``) with its own decoding
workers, and meets the others at two barriers (torch.distributed: NCCL on GPUs, gloo on CPUs). The core
imports no Accelerate: the launchers' environment contract is all it needs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .detector import Detector, ItemResult, Prediction


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """This process's place among the processes a launcher started (one process when started alone)."""
    env = os.environ
    return World(rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)),
                 local_rank=int(env.get("LOCAL_RANK", 0)))


def start(world: World, device: str) -> str:
    """Join the process group when there are several processes; returns this process's device."""
    if world.size == 1:
        return device
    import torch
    import torch.distributed as dist

    gpu = device != "cpu" and torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
        "1", "true", "yes")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    return "cpu"


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def parts_dir(output: str | os.PathLike[str]) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".parts")


def read_parts(folder: Path) -> dict[str, dict[str, Any]]:
    """Every row the shards hold, by file key. A last line cut short by a kill is ignored (rescored)."""
    rows: dict[str, dict[str, Any]] = {}
    for shard in sorted(folder.glob("rank-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "key" in row:
                    rows[row["key"]] = row
    return rows


def _row(r: ItemResult) -> dict[str, Any]:
    p = r.prediction
    row = {"key": str(r.path), "score": p.score if p else None, "label": p.label if p else None,
           "experts": p.experts if p else None, "error": r.error, "error_code": r.error_code}
    if p is not None and p.faces is not None:
        row["faces"], row["whole_score"], row["face_rule"] = p.faces, p.whole_score, p.face_rule
    if p is not None and p.provenance is not None:
        row["provenance"], row["label_by"] = p.provenance, p.label_by
    return row


def to_result(row: dict[str, Any]) -> ItemResult:
    pred = Prediction(row["score"], row["label"], row["experts"], faces=row.get("faces"),
                      whole_score=row.get("whole_score"), face_rule=row.get("face_rule"),
                      provenance=row.get("provenance"),
                      label_by=row.get("label_by", "model")) if row.get("score") is not None else None
    return ItemResult(Path(row["key"]), pred, row.get("error"), row.get("error_code"))


def score_to_parts(det: Detector, paths: Sequence[Path], output: str | os.PathLike[str], *, world: World,
                   resume: bool, workers: int | None, progress: bool, desc: str,
                   prepare: Callable[[Path, Any], Any] | None = None, faces: Any = None,
                   provenance: Any = None) -> list[ItemResult] | None:
    """Score this process's share of ``paths`` into its shard; on the main process return every file's
    result in ``paths`` order once all processes are done (None on the others). ``prepare``, ``faces``,
    ``provenance``: see :meth:`Detector.predict_paths`."""
    folder = parts_dir(output)
    if folder.exists() and not resume:
        raise ValueError(f"{folder} holds the rows of an unfinished run: pass --resume to continue it, or "
                              "delete the folder to start over")
    barrier(world)  # every process has looked before any writes
    folder.mkdir(parents=True, exist_ok=True)
    done = read_parts(folder) if resume else {}
    mine = [p for i, p in enumerate(paths) if i % world.size == world.rank and str(p) not in done]
    shard = folder / f"rank-{world.rank:05d}.jsonl"
    if shard.exists() and shard.stat().st_size:
        with open(shard, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:  # a kill cut the last line short: end it, so the next row starts on a line of its own
            with open(shard, "a", encoding="utf-8") as f:
                f.write("\n")
    with open(shard, "a", encoding="utf-8") as f:
        for batch in _batches(det.predict_paths(mine, workers=workers, progress=progress and world.is_main,
                                                desc=desc, prepare=prepare, faces=faces,
                                                provenance=provenance),
                                    det.batch_size):
            f.write("".join(json.dumps(_row(r)) + "\n" for r in batch))
            f.flush()
    barrier(world)
    if not world.is_main:
        return None
    rows = read_parts(folder)
    missing = [p for p in paths if str(p) not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} file(s) have no row after every process finished (first: {missing[0]})")
    return [to_result(rows[str(p)]) for p in paths]


def remove_parts(output: str | os.PathLike[str]) -> None:
    shutil.rmtree(parts_dir(output), ignore_errors=True)


def _batches(items: Iterator[ItemResult], n: int) -> Iterator[list[ItemResult]]:
    batch: list[ItemResult] = []
    for item in items:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
