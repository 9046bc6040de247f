"""Scoring one partition: read it batch by batch, run the model, write its
output file, move the file into place.

:class:`PartitionScorer` is the callable class Ray Data runs in its actor
pool: it loads the model once (``__init__``) and scores one partition per
call, streaming, so an actor holds one batch of rows at a time whatever the
partition's size. A partition that fails (a corrupt file, a column of nulls)
returns its error; it never takes down the actor or the other partitions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time

import msgspec
import numpy as np

from flywheel.batch.job import ROW_COLUMN, RUN_COLUMN, SOURCE_COLUMN, VERSION_COLUMN, PredictJob
from flywheel.batch.mapping import InputPlan, to_inputs
from flywheel.batch.model import ModelSource, load
from flywheel.batch.output import OutputFolder
from flywheel.batch.readers import IMAGE_LABEL_COLUMN, ImageShape, read_batches
from flywheel.batch.sources import Partition
from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import FlywheelError

log = logging.getLogger(__name__)


class ScoringPlan(msgspec.Struct, frozen=True):
    """Everything an actor needs, decided once by the driver."""

    job: PredictJob
    model: ModelSource
    inputs: list[InputPlan]
    run_id: str
    batch_rows: int
    image: tuple[int, ...] = ()  # the image input's shape, for format images
    hive_keys: list[str] = []


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class PartitionScorer:
    """Ray Data's actor: ``__call__`` takes a batch of partitions (JSON)
    and returns one summary row each."""

    def __init__(self, plan: bytes) -> None:
        self.plan = msgspec.msgpack.decode(plan, type=ScoringPlan)
        job = self.plan.job
        self.model = load(self.plan.model, threads=job.threads, gpu=job.num_gpus > 0, rows=self.plan.batch_rows)
        self.output = OutputFolder(job.output)
        self.image = ImageShape(tuple(self.plan.image), self.plan.inputs[0].name) if self.plan.image else None
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        rows = [self.score(msgspec.json.decode(p, type=Partition)) for p in batch["partition"]]
        return {k: np.array([r[k] for r in rows], dtype=object if k in ("name", "error", "node") else None)
                for k in rows[0]}

    def score(self, part: Partition) -> dict:
        start = time.perf_counter()
        tmp = self.output.temp_path(part.name)
        try:
            n = self._write(part, tmp)
            self.output.commit(tmp, part.name)
            error = ""
        except Exception as exc:  # noqa: BLE001 - one partition's failure is its own, reported by name
            n = 0
            error = exc.message if isinstance(exc, FlywheelError) else f"{part.rel}: {type(exc).__name__}: {exc}"
            if part.rel not in error:
                error = f"{part.rel}: {error}"
            log.warning("partition %s failed: %s", part.name, error)
            try:
                self.output.fs.rm(tmp)
            except OSError:
                pass
        return {"name": part.name, "rows": n, "error": error, "node": self.node,
                "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}

    def _write(self, part: Partition, tmp: str) -> int:
        import pyarrow.parquet as pq

        plan, job = self.plan, self.plan.job
        needed = [c for p in plan.inputs for c in p.needed] + list(job.keys) + ([job.label] if job.label else [])
        needed = list(dict.fromkeys(c for c in needed if c not in part.hive))
        image_dtype = numpy_dtype(plan.inputs[0].datatype) if self.image else None
        row = part.first_row
        with (contextlib.nullcontext(tmp) if self.output.local else self.output.fs.open(tmp, "wb")) as sink:
            writer = None
            try:
                for batch in read_batches(self.input_fs, part, plan.batch_rows,
                                          needed if part.format == "parquet" else None, self.image, image_dtype):
                    if batch.num_rows == 0:
                        continue
                    outputs = self.model.infer(to_inputs(batch, plan.inputs, f"input file {part.rel}"))
                    table = self._table(part, batch, outputs, row)
                    if writer is None:
                        writer = pq.ParquetWriter(sink, table.schema, use_dictionary=_dictionary_columns(table.schema))
                    writer.write_batch(table)
                    row += batch.num_rows
                if writer is None:  # an empty partition still gets its (empty) file
                    writer = pq.ParquetWriter(sink, self._empty_schema())
            finally:
                if writer is not None:
                    writer.close()
        return row - part.first_row

    @property
    def input_fs(self):
        # the input's file system, opened once per actor
        fs = getattr(self, "_input_fs", None)
        if fs is None:
            import fsspec

            fs = self._input_fs = fsspec.core.url_to_fs(self.plan.job.input)[0]
        return fs

    def _table(self, part: Partition, batch, outputs: dict[str, np.ndarray], row: int):
        import pyarrow as pa

        n = batch.num_rows
        job = self.plan.job
        names, cols = [], []
        if part.format == "images":
            first = row - part.first_row
            names.append(SOURCE_COLUMN)
            cols.append(pa.array([rel for _, rel, _ in part.images[first:first + n]]))
        else:
            names.append(SOURCE_COLUMN)
            cols.append(_constant(part.rel, n))
        names.append(ROW_COLUMN)
        cols.append(pa.array(np.arange(row, row + n, dtype=np.int64)))
        for key in self.plan.hive_keys:
            names.append(key)
            cols.append(_constant(part.hive.get(key, ""), n))
        for key in job.keys:
            if key not in names:
                names.append(key)
                cols.append(_constant(part.hive[key], n) if key in part.hive else batch.column(key))
        if job.label:
            names.append(job.label)
            cols.append(batch.column(IMAGE_LABEL_COLUMN if part.format == "images" else job.label))
        for name, arr in outputs.items():
            names.append(name)
            cols.append(_column(arr))
        names += [VERSION_COLUMN, RUN_COLUMN]
        cols += [_constant(self.plan.model.label, n), _constant(self.plan.run_id, n)]
        return pa.RecordBatch.from_arrays(cols, names)

    def _empty_schema(self):
        import pyarrow as pa

        return pa.schema([(SOURCE_COLUMN, pa.string()), (ROW_COLUMN, pa.int64())])


def _dictionary_columns(schema) -> list[str]:
    """Columns worth dictionary-encoding: text (constants such as ``source``
    and ``run_id``, text keys). Pyarrow's default tries every column, and on
    model outputs (floats that never repeat) that alone costs more than the
    rest of the write."""
    import pyarrow.types as pt

    def text(t) -> bool:
        return pt.is_dictionary(t) or pt.is_string(t) or pt.is_large_string(t) or pt.is_binary(t)

    return [f.name for f in schema if text(f.type)]


def _constant(value: str, n: int):
    """A string column of one repeated value, stored once (dictionary)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def _column(arr: np.ndarray):
    """A model output as a column: a scalar per row, or a fixed-size list
    of the row's values (flattened in C order when the row is n-d)."""
    import pyarrow as pa

    if arr.dtype == object:
        flat = arr.reshape(len(arr), -1)
        if flat.shape[1] == 1:
            return pa.array(list(flat[:, 0]), pa.binary())
        return pa.FixedSizeListArray.from_arrays(pa.array(list(flat.reshape(-1)), pa.binary()), flat.shape[1])
    if arr.ndim == 1:
        return pa.array(arr)
    flat = np.ascontiguousarray(arr).reshape(len(arr), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _node_id() -> str:
    import sys

    ray = sys.modules.get("ray")  # an actor has it; a direct call (tests) may not
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return os.uname().nodename
