"""The input of a run: its files, how they split into partitions, and their
fingerprints.

A partition is the unit of work and of output: one actor scores it and one
Parquet file holds its result, so a partition is either wholly written or not
at all. A file is one partition, except a large Parquet file, which splits
into runs of whole row groups (it still spreads over the actors), and an image
folder, whose images come in chunks.
"""

from __future__ import annotations

import hashlib
import posixpath

import msgspec

from flywheel.protocol.errors import InvalidInputError

_EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy",
    ".png": "images", ".jpg": "images", ".jpeg": "images",
}
IMAGES_PER_PARTITION = 512
_GLOB = set("*?[")


class Partition(msgspec.Struct, frozen=True):
    """One unit of work.

    name: the output file's stem, stable across runs of the same input.
    path: the file (in ``fs``'s terms; for images, the first image).
    rel: ``path`` relative to the input root: the ``source`` of its rows.
    format: parquet | csv | npy | images.
    stamp: size and modification time (or ETag) of the file(s), so that a
        resumed run notices an input that changed under it.
    row_groups: Parquet only: the row groups it covers (empty: all).
    rows: rows it holds (-1: unknown until read, as for CSV).
    size: bytes on disk (progress for inputs of unknown row count).
    hive: ``key=value`` folder names above the file.
    images: images only: (path, rel path, label) of each image.
    first_row: index of its first row in the file (row groups split a file).
    """

    name: str
    path: str
    rel: str
    format: str
    stamp: str
    row_groups: tuple[int, ...] = ()
    rows: int = -1
    size: int = 0
    hive: dict[str, str] = {}
    images: tuple[tuple[str, str, str], ...] = ()
    first_row: int = 0


def open_input(uri: str):
    """(filesystem, root path, [files]) for a file, folder, glob or fsspec
    URI; InvalidInputError when nothing is there."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if any(c in _GLOB for c in path):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
        root = path[: min(path.index(c) for c in _GLOB if c in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        files = sorted(fs.find(path))
        root = path.rstrip("/")
    elif fs.exists(path):
        files, root = [path], posixpath.dirname(path)
    else:
        raise InvalidInputError(f"input {uri!r}: no such file or folder")
    # hidden and underscore names anywhere below the root (Spark's _temporary/,
    # _SUCCESS, .crc files) are not data, as pyarrow and Ray Data also assume
    files = [f for f in files
             if not any(p.startswith((".", "_")) for p in _relative(root, f).split("/"))]
    if not files:
        raise InvalidInputError(f"input {uri!r}: no files there")
    return fs, root, files


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local disk (where Arrow's own
    file I/O and a rename are available)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol


def detect_format(files: list[str], wanted: str) -> str:
    """The input format: ``wanted``, or the one every file's extension names."""
    kinds = {_EXTENSIONS.get(posixpath.splitext(f)[1].lower()) for f in files}
    if wanted != "auto":
        return wanted
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    names = sorted(posixpath.splitext(f)[1] or posixpath.basename(f) for f in files)
    raise InvalidInputError(
        f"input: cannot tell the format from the file extensions {sorted(set(names))[:6]}; "
        f"give format (parquet, csv, npy or images) and make the files agree"
    )


def _stamp(info: dict) -> str:
    changed = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size', 0)}:{changed}"


def _hive(rel: str) -> dict[str, str]:
    parts = rel.split("/")[:-1]
    return dict(p.split("=", 1) for p in parts if "=" in p and not p.startswith("="))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _relative(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root else path


def plan_partitions(fs, root: str, files: list[str], fmt: str, partition_rows: int) -> list[Partition]:
    """Every partition of the input, in a stable order."""
    if fmt == "images":
        return _image_partitions(fs, root, files)
    out = []
    for path in files:
        info = fs.info(path)
        rel = _relative(root, path)
        base = dict(path=path, rel=rel, format=fmt, stamp=_stamp(info), size=int(info.get("size", 0)),
                    hive=_hive(rel))
        if fmt == "parquet":
            out.extend(_parquet_partitions(fs, path, rel, base, partition_rows))
        elif fmt == "npy":
            out.append(Partition(name=f"part-{_digest(rel)}", rows=_npy_rows(fs, path), **base))
        else:
            out.append(Partition(name=f"part-{_digest(rel)}", **base))
    return out


def _parquet_partitions(fs, path: str, rel: str, base: dict, partition_rows: int) -> list[Partition]:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow's own words say what is wrong
        raise InvalidInputError(f"input file {rel}: not a readable Parquet file: {exc}") from None
    groups: list[list[int]] = [[]]
    counts = [0]
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if groups[-1] and counts[-1] + n > partition_rows:
            groups.append([])
            counts.append(0)
        groups[-1].append(g)
        counts[-1] += n
    if len(groups) == 1:
        return [Partition(name=f"part-{_digest(rel)}", rows=meta.num_rows, **base)]
    out, first = [], 0
    for k, (gs, n) in enumerate(zip(groups, counts)):
        out.append(Partition(name=f"part-{_digest(rel)}-{k:04d}", rows=n, row_groups=tuple(gs),
                             first_row=first, **base))
        first += n
    return out


def _npy_rows(fs, path: str) -> int:
    import numpy as np

    with fs.open(path, "rb") as f:
        try:
            shape = npy_header(f)[0]
        except ValueError as exc:
            raise InvalidInputError(f"input file {path}: not a NumPy .npy file: {exc}") from None
    if not shape:
        raise InvalidInputError(f"input file {path}: a 0-d array has no rows")
    return int(shape[0])


def npy_header(f) -> tuple[tuple[int, ...], bool, object]:
    """(shape, fortran_order, dtype) of an open .npy file, left at its data."""
    import numpy as np

    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def _image_partitions(fs, root: str, files: list[str]) -> list[Partition]:
    """Images under ``root/<label>/``, in chunks of IMAGES_PER_PARTITION per
    label folder."""
    by_label: dict[str, list[str]] = {}
    for path in files:
        rel = _relative(root, path)
        label = rel.split("/")[0] if "/" in rel else ""
        if posixpath.splitext(path)[1].lower() not in (".png", ".jpg", ".jpeg"):
            raise InvalidInputError(f"input file {rel}: not a PNG or JPEG image (format images)")
        by_label.setdefault(label, []).append(path)
    out = []
    for label, paths in sorted(by_label.items()):
        for k in range(0, len(paths), IMAGES_PER_PARTITION):
            chunk = paths[k:k + IMAGES_PER_PARTITION]
            infos = [fs.info(p) for p in chunk]
            stamp = hashlib.sha256("".join(_stamp(i) for i in infos).encode()).hexdigest()[:24]
            rels = tuple((p, _relative(root, p), label) for p in chunk)
            out.append(Partition(
                name=f"part-{_digest(label or '.')}-{k // IMAGES_PER_PARTITION:04d}", path=chunk[0],
                rel=rels[0][1], format="images", stamp=stamp, rows=len(chunk),
                size=sum(int(i.get("size", 0)) for i in infos), images=rels, first_row=k,
            ))
    return out


def fingerprint(fs, files: list[str], root: str) -> str:
    """sha256 of the input's manifest: each file's relative name and the
    sha256 of its bytes, sorted by name. What lineage records for a data set."""
    lines = []
    for path in sorted(files):
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        lines.append(f"{_relative(root, path)}\t{h.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
