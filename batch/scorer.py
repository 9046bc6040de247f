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
from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError

log = logging.getLogger(__name__)


class ScoringPlan(msgspec.Struct, frozen=True):
    """Everything an actor needs, decided once by the driver.

    output_schema: every output file's Arrow schema (IPC bytes), so that
        all partitions agree, an empty one included. csv_types: Arrow types
        (IPC schema bytes) that CSV columns are read as, where the first
        block's inference could guess narrower than later rows.
    """

    job: PredictJob
    model: ModelSource
    inputs: list[InputPlan]
    run_id: str
    batch_rows: int
    image: tuple[int, ...] = ()  # the image input's shape, for format images
    hive_keys: list[str] = []
    output_schema: bytes = b""
    csv_types: bytes = b""


def _arrow_type(datatype: str, shape: tuple[int, ...]):
    """A model output's column type: a scalar per row for ``[-1]``, else a
    list of the row's values (fixed-size where the shape is)."""
    import pyarrow as pa

    value = pa.binary() if datatype == "BYTES" else pa.from_numpy_dtype(numpy_dtype(datatype))
    dims = shape[1:]
    if not dims:
        return value
    if any(d < 0 for d in dims):
        return pa.list_(value)
    return pa.list_(value, int(np.prod(dims)))


def output_schema(job: PredictJob, model: ModelSource, hive_keys: list[str], types: dict, fmt: str):
    """The schema of every output file: source, row, Hive keys, the keys,
    the label, the model's outputs, model_version, run_id. ``types``: the
    input columns' Arrow types (first non-null across the files)."""
    import pyarrow as pa

    text = pa.dictionary(pa.int32(), pa.string())
    fields = [(SOURCE_COLUMN, pa.string() if fmt == "images" else text), (ROW_COLUMN, pa.int64())]
    fields += [(k, text) for k in hive_keys]
    fields += [(k, text if k in hive_keys else types.get(k, pa.null())) for k in job.keys if k not in hive_keys]
    if job.label:
        fields.append((job.label, pa.string() if fmt == "images" else types.get(job.label, pa.null())))
    taken = {name for name, _ in fields} | {VERSION_COLUMN, RUN_COLUMN}
    for t in model.signature.outputs:
        if t.name in taken:
            raise ConfigError(f"model output {t.name!r} has the name of a column the output already holds "
                              f"(source, row, model_version, run_id, a key or the label); rename the key or "
                              "label column, or export the model with another output name")
    fields += [(t.name, _arrow_type(t.datatype, t.shape)) for t in model.signature.outputs]
    fields += [(VERSION_COLUMN, text), (RUN_COLUMN, text)]
    seen, unique = set(), []
    for name, t in fields:
        if name not in seen:
            seen.add(name)
            unique.append(pa.field(name, t))
    return pa.schema(unique)


def csv_types(job: PredictJob, inputs: list[InputPlan], types: dict):
    """Arrow types to read CSV columns as: model inputs as their datatype
    asks (FP32 from float64, so '1' then '0.5' both parse), keys and the
    label as the first file showed them."""
    import pyarrow as pa

    wanted = {}
    for plan in inputs:
        kind = numpy_dtype(plan.datatype)
        t = pa.binary() if plan.datatype == "BYTES" else pa.bool_() if plan.datatype == "BOOL" else \
            pa.float64() if kind.kind == "f" else pa.int64()
        for col in plan.columns:
            wanted[col] = t
    for col in (*job.keys, job.label):
        if col and col in types and not pa.types.is_null(types[col]):
            wanted.setdefault(col, types[col])
    return pa.schema(list(wanted.items()))


def pyarrow_schema(blob: bytes):
    """An Arrow schema from the IPC bytes a plan carries (None for none)."""
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(blob)) if blob else None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class PartitionScorer:
    """Ray Data's actor: ``__call__`` takes a batch of partitions (JSON)
    and returns one summary row each."""

    def __init__(self, plan: bytes) -> None:
        import fsspec

        self.plan = msgspec.msgpack.decode(plan, type=ScoringPlan)
        job = self.plan.job
        self.model = load(self.plan.model, threads=job.threads, gpu=job.num_gpus > 0, rows=self.plan.batch_rows)
        self.output = OutputFolder(job.output)
        self.input_fs = fsspec.core.url_to_fs(job.input)[0]
        self.image = ImageShape(tuple(self.plan.image), self.plan.inputs[0].name) if self.plan.image else None
        self.schema = pyarrow_schema(self.plan.output_schema)
        csv = pyarrow_schema(self.plan.csv_types)
        self.csv_types = {f.name: f.type for f in csv} if csv is not None else {}
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
                writer = pq.ParquetWriter(sink, self.schema, use_dictionary=_dictionary_columns(self.schema))
                for batch in read_batches(self.input_fs, part, plan.batch_rows,
                                          needed if part.format == "parquet" else None, self.image, image_dtype,
                                          self.csv_types):
                    if batch.num_rows == 0:
                        continue
                    outputs = self.model.infer(to_inputs(batch, plan.inputs, f"input file {part.rel}"))
                    writer.write_batch(self._table(part, batch, outputs, row))
                    row += batch.num_rows
            finally:
                if writer is not None:
                    writer.close()
        return row - part.first_row

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
        by_name = dict(zip(names, cols))
        out = []
        for field in self.schema:  # every partition's file has the same schema
            col = by_name[field.name]
            if col.type != field.type:
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise InvalidInputError(f"input file {part.rel}: column {field.name!r} is {col.type} here, "
                                            f"{field.type} in the run's first file: {exc}") from None
            out.append(col)
        return pa.RecordBatch.from_arrays(out, schema=self.schema)


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
