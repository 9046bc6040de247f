"""Data larger than the driver: Ray Data datasets built lazily in the
driver and streamed to the Train workers.

:func:`open_streamed` (the driver) lists the files and reads only what the
job must know before it starts: the row shape and labels (schema, ``.npy``
headers, the class folders), row counts per split, a bounded sample of
training rows (the drift monitor's reference and the model check) and a
fingerprint of the files' names, sizes and mtimes (the sample: the first
training rows in reading order, for parquet/csv from the first file). The
driver never holds more rows than that sample. The rows themselves are
read by Ray Data tasks on the cluster (training/stream_rows.py) and reach
each worker through ``ray.train.get_dataset_shard``:
:func:`worker_batches` (training, split across the workers) and
:func:`validation_batches` (the whole validation split on every worker).

Order: ``preserve_order`` is on; the npy chunks and image files are in a
seeded order fixed for the job, Parquet/CSV rows in file order; each worker
shuffles its rows in a local buffer seeded by (seed, epoch, rank). Ray
Data's split of blocks among workers is dynamic, so two runs may give a
worker different rows: streamed training is deterministic per block
assignment, not bit-exact across runs. A resume from a mid-epoch
checkpoint skips as many batches of that epoch as were trained (it neither
replays them nor trains twice on a step), then goes on to the same total
of steps and epochs; which rows those skipped batches held is not
guaranteed to match the first attempt's.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from flywheel.protocol.errors import InvalidInputError
from flywheel.training.data import JobData
from flywheel.training.stream_rows import SPLITS, held_out, index_keys, path_keys

# Ray Data's tasks default to a whole CPU each; beside Train workers that
# hold whole CPUs (and serving replicas on the same cluster) they could wait
# for one forever, and the workers with them. A quarter CPU each lets reads
# and decodes run in what the workers leave.
DATA_TASK_CPUS = 0.25
CHUNK_BYTES = 16 << 20  # one npy read task's rows: bounded memory per block
IMAGE_BATCH = 64  # images decoded per Ray Data call
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLE_MIN = 2  # the model check runs two rows


def open_streamed(spec, *, seed: int, regression: bool = False) -> JobData:
    """A JobData whose ``datasets`` are the lazy Ray Data ``train`` and
    ``validation`` datasets of DatasetSpec ``spec`` (a streamed kind) and
    whose arrays hold only a sample of training rows, flattened per row.
    InvalidInputError for missing files, mismatched pairs, bad labels or
    fewer than 2 training rows."""
    build = {"npy": _npy, "images": _images}.get(spec.kind, _table)
    datasets, meta = build(spec, seed, regression)
    if meta["train_rows"] < 2:
        raise InvalidInputError(f"dataset {meta['what']} has {meta['train_rows']} training rows; a job needs at least 2")
    want = max(SAMPLE_MIN, spec.reference_rows)
    sample = meta.get("sample") or datasets["train"].limit(want).take_batch(want, batch_format="numpy")
    x = np.array(sample["x"], dtype=np.float32)  # a writable copy (Ray's blocks are read-only)
    row_shape = tuple(int(d) for d in x.shape[1:])
    y = np.array(sample["y"])
    return JobData(
        x_train=x.reshape(len(x), -1), y_train=y,
        x_val=np.zeros((0, int(np.prod(row_shape))), np.float32), y_val=y[:0],
        fingerprint=meta["fingerprint"], description=meta["what"],
        train_rows=meta["train_rows"], val_rows=meta["val_rows"], classes=meta["classes"],
        row_shape=row_shape, datasets=datasets,
    )


def files_fingerprint(kind: str, files: list[str], extra: str = "") -> str:
    """sha256 of the files' paths, sizes and mtimes (and ``extra``: what
    else decides the rows): a changed, added or removed file changes it.
    Cheap by design; a file rewritten with the same size within the same
    mtime tick goes unnoticed."""
    h = hashlib.sha256(f"{kind}\n{extra}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def list_files(path: str, suffixes: tuple[str, ...], field: str) -> list[str]:
    """A file, a folder (its files with those suffixes) or a glob, sorted."""
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(suffixes)]
    else:
        files = glob.glob(path) or ([path] if os.path.exists(path) else [])
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise InvalidInputError(f"{field} {path!r}: no {'/'.join(suffixes)} files there")
    return files


def _preserving(ds):
    ds.context.execution_options.preserve_order = True
    return ds


def _npy(spec, seed: int, regression: bool):
    import ray

    from flywheel.training.stream_rows import npy_rows

    xs = list_files(spec.path, (".npy",), "dataset.path")
    ys = list_files(spec.labels_path, (".npy",), "dataset.labels_path")
    if len(xs) != len(ys):
        raise InvalidInputError(f"dataset: {len(xs)} features file(s) under dataset.path but {len(ys)} labels "
                                "file(s) under dataset.labels_path; they pair one to one, in sorted order")
    items, counts, top, row_shape = [], {s: 0 for s in SPLITS}, -1.0, None
    for i, (xf, yf) in enumerate(zip(xs, ys)):
        x, y = np.load(xf, mmap_mode="r"), np.load(yf, mmap_mode="r")  # headers only, until sliced
        if x.ndim < 2 or x.dtype.kind not in "biuf":
            raise InvalidInputError(f"dataset.path {xf}: features must be numbers [rows, *row_shape], "
                                    f"not {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise InvalidInputError(f"dataset.labels_path {yf}: needs {len(x)} labels in one dimension (the rows "
                                    f"of {os.path.basename(xf)}), has shape {list(y.shape)}")
        if row_shape is not None and x.shape[1:] != row_shape:
            raise InvalidInputError(f"dataset.path {xf}: rows of shape {list(x.shape[1:])}, the first file's "
                                    f"are {list(row_shape)}")
        if y.dtype.kind not in ("iu" if not regression else "iuf"):
            raise InvalidInputError(f"dataset.labels_path {yf} must hold "
                                    + ("numbers" if regression else "integer class ids") + f", not {y.dtype}")
        row_shape = x.shape[1:]
        step = max(1, CHUNK_BYTES // max(1, x.itemsize * int(np.prod(row_shape))))
        for a in range(0, len(x), step):
            b = min(len(x), a + step)
            items.append({"features": xf, "labels": yf, "file": i, "start": a, "stop": b})
            val = held_out(index_keys(i, a, b - a), seed, spec.validation_fraction)
            counts["validation"] += int(val.sum())
            counts["train"] += int((~val).sum())
            if not regression and b > a:
                top = max(top, float(np.max(y[a:b])))
    order = np.random.default_rng([seed, 1]).permutation(len(items))
    items = [items[j] for j in order]
    datasets = {}
    for split in SPLITS:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        datasets[split] = _preserving(ds.map_batches(
            npy_rows, batch_size=1, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
            fn_kwargs={"regression": regression, "split": split, "seed": seed,
                       "fraction": spec.validation_fraction}))
    meta = {"what": f"npy {spec.path} + {spec.labels_path} ({len(xs)} file pair(s))",
            "fingerprint": files_fingerprint("npy", xs + ys),
            "train_rows": counts["train"], "val_rows": counts["validation"],
            "classes": 0 if regression else int(top) + 1}
    return datasets, meta


def _images(spec, seed: int, regression: bool):
    import ray

    from flywheel.training.stream_rows import image_rows

    if regression:
        raise InvalidInputError("dataset.kind 'images' labels images by their folder: task must be classification")
    root = spec.path
    if not os.path.isdir(root):
        raise InvalidInputError(f"dataset.path {root!r} must be a folder with one subfolder per class")
    classes = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        found = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        paths += [os.path.join(folder, n) for n in found]
        labels += [label] * len(found)
    if not paths:
        raise InvalidInputError(f"dataset.path {root!r}: no PNG/JPEG files in class subfolders")
    # keyed by the path below the root: moving the folder keeps the split
    val = held_out(path_keys([os.path.relpath(p, root) for p in paths]), seed, spec.validation_fraction)
    order = np.random.default_rng([seed, 1]).permutation(len(paths))
    datasets, counts = {}, {}
    for split in SPLITS:
        keep = [j for j in order if bool(val[j]) == (split == "validation")]
        counts[split] = len(keep)
        items = [{"path": paths[j], "label": labels[j]} for j in keep]
        # one block per decode batch: a small folder is one task, not one per image
        blocks = max(1, math.ceil(len(items) / IMAGE_BATCH))
        ds = (ray.data.from_items(items, override_num_blocks=blocks) if items
              else ray.data.from_items([{"path": "", "label": 0}]).limit(0))
        datasets[split] = _preserving(ds.map_batches(
            image_rows, batch_size=IMAGE_BATCH, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
            fn_kwargs={"size": tuple(spec.image_size), "mode": spec.image_mode or "rgb"}))
    extra = f"{list(spec.image_size)} {spec.image_mode or 'rgb'} {classes}"
    meta = {"what": f"images {root} ({len(classes)} classes: {', '.join(classes)})",
            "fingerprint": files_fingerprint("images", paths, extra),
            "train_rows": counts["train"], "val_rows": counts["validation"], "classes": len(classes)}
    return datasets, meta


def _table(spec, seed: int, regression: bool):
    import ray

    from flywheel.training.stream_rows import split_counts, table_rows

    files = list_files(spec.path, (f".{spec.kind}",), "dataset.path")
    remote = {"num_cpus": DATA_TASK_CPUS}
    raw = (ray.data.read_parquet(files, ray_remote_args=remote) if spec.kind == "parquet"
           else ray.data.read_csv(files, ray_remote_args=remote))
    # the first rows of the first file, read here: a bad column fails the
    # job with its own message (not inside a Ray task's traceback), and
    # their training rows are the sample (up to reference_rows of them)
    head = table_head(spec.kind, files[0], max(SAMPLE_MIN * 4, spec.reference_rows))
    features = list(spec.features) or [c for c in head if c != spec.label]
    kwargs = {"features": features, "label": spec.label, "regression": regression, "seed": seed,
              "fraction": spec.validation_fraction}
    sample = table_rows(head, split="train", **kwargs)
    counts = {s: 0 for s in SPLITS}
    top = -1.0
    for row in raw.map_batches(split_counts, batch_format="numpy", num_cpus=DATA_TASK_CPUS, fn_kwargs=kwargs).iter_rows():
        for s in SPLITS:
            counts[s] += int(row[s])
        top = max(top, float(row["max_label"]))
    datasets = {split: _preserving(raw.map_batches(table_rows, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
                                                   fn_kwargs={**kwargs, "split": split}))
                for split in SPLITS}
    meta = {"what": f"{spec.kind} {spec.path} (streamed)",
            "fingerprint": files_fingerprint(spec.kind, files, f"{features} {spec.label}"),
            "train_rows": counts["train"], "val_rows": counts["validation"],
            "classes": 0 if regression else int(top) + 1,
            "sample": sample if len(sample["y"]) >= SAMPLE_MIN else None}
    return datasets, meta


def table_head(kind: str, path: str, rows: int) -> dict[str, np.ndarray]:
    """Up to ``rows`` first rows of one Parquet/CSV file as NumPy columns,
    read in batches (never the whole file), the way Ray Data reads them
    (pyarrow)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows), None)
    else:
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(path)
        batch = next(iter(reader), None)
    if batch is None:
        raise InvalidInputError(f"dataset.path: {path} has no rows")
    batch = batch.slice(0, rows)
    return {name: batch.column(i).to_numpy(zero_copy_only=False) for i, name in enumerate(batch.schema.names)}


# -- on the workers --------------------------------------------------------

def shuffle_buffer(per_rank: int) -> int:
    """Rows each worker shuffles locally: a few batches' worth."""
    return max(4 * per_rank, 256)


def worker_batches(per_rank: int, *, seed: int, epoch: int, rank: int) -> Iterator[dict[str, Any]]:
    """This worker's training batches of one epoch (``per_rank`` rows each;
    a last short batch is dropped, so every rank has the same count when
    Ray Data splits the rows equally)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    local_seed = int(np.random.default_rng([seed, epoch, rank]).integers(0, 2**31 - 1))
    return shard.iter_batches(batch_size=per_rank, batch_format="numpy", drop_last=True,
                              local_shuffle_buffer_size=shuffle_buffer(per_rank), local_shuffle_seed=local_seed)


def validation_batches(batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """The whole validation split, in order (the same on every worker)."""
    import ray.train

    return ray.train.get_dataset_shard("validation").iter_batches(batch_size=batch_size, batch_format="numpy")


def ingest_config():
    """Ray Train's DataConfig: the train split is divided among the
    workers, the validation split is read whole by each, in order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)
