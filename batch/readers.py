"""Reading a partition as a stream of Arrow record batches, and a file's
schema without reading its rows.

Every format becomes record batches: NumPy arrays and decoded images arrive
as one fixed-size-list column (``array``, ``image``) so that one mapping step
(batch/mapping.py) serves them all. Only one batch of a partition is in memory
at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from flywheel.batch.sources import Partition, is_local, npy_header
from flywheel.protocol.errors import InvalidInputError

NPY_COLUMN = "array"
IMAGE_COLUMN = "image"
IMAGE_LABEL_COLUMN = "label"
_CSV_BLOCK = 4 << 20


class ImageShape:
    """How images are laid out for a model input: ``chw`` / ``hwc`` with C
    in (1, 3), or ``hw`` (grayscale), from the input's shape."""

    def __init__(self, shape: tuple[int, ...], input_name: str) -> None:
        dims = shape[1:]
        if len(dims) == 3 and dims[0] in (1, 3) and dims[2] not in (1, 3):
            self.layout, self.c, self.h, self.w = "chw", dims[0], dims[1], dims[2]
        elif len(dims) == 3 and dims[2] in (1, 3):
            self.layout, self.h, self.w, self.c = "hwc", dims[0], dims[1], dims[2]
        elif len(dims) == 2:
            self.layout, self.h, self.w, self.c = "hw", dims[0], dims[1], 1
        else:
            raise InvalidInputError(
                f"model input {input_name!r} has shape {list(shape)}; images need [-1, C, H, W], "
                "[-1, H, W, C] (C 1 or 3) or [-1, H, W]"
            )
        if min(self.h, self.w) < 1:
            raise InvalidInputError(f"model input {input_name!r}: images need fixed H and W, got {list(shape)}")

    @property
    def width(self) -> int:
        return self.c * self.h * self.w


def file_schema(fs, part: Partition, image: ImageShape | None = None, image_dtype: np.dtype | None = None):
    """The Arrow schema a partition's batches will have; InvalidInputError
    naming the file when it cannot be read."""
    import pyarrow as pa

    try:
        if part.format == "parquet":
            import pyarrow.parquet as pq

            with fs.open(part.path, "rb") as f:
                return pq.ParquetFile(f).schema_arrow
        if part.format == "csv":
            import pyarrow.csv as pcsv

            with fs.open(part.path, "rb") as f:
                return pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK)).schema
        if part.format == "npy":
            with fs.open(part.path, "rb") as f:
                shape, _, dtype = npy_header(f)
            width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            return pa.schema([(NPY_COLUMN, pa.list_(pa.from_numpy_dtype(dtype), width))],
                             metadata={b"row_shape": str(list(shape[1:])).encode()})
        if part.format == "images":
            width = image.width if image else 0
            values = pa.from_numpy_dtype(image_dtype) if image_dtype is not None else pa.float32()
            return pa.schema([(IMAGE_COLUMN, pa.list_(values, width)), (IMAGE_LABEL_COLUMN, pa.string())])
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader's own words say what is wrong
        raise InvalidInputError(f"input file {part.rel}: cannot read it as {part.format}: {exc}") from None
    raise InvalidInputError(f"format {part.format!r} unknown")


def read_batches(fs, part: Partition, rows: int, columns: list[str] | None,
                 image: ImageShape | None = None, image_dtype: np.dtype | None = None,
                 column_types: dict | None = None) -> Iterator:
    """The partition's rows as record batches of at most ``rows`` rows.
    ``columns``: the ones needed (None: all; Parquet reads no others).
    ``column_types``: CSV only: Arrow types for these columns, where
    inference from the first block could guess narrower than later rows."""
    if part.format == "parquet":
        yield from _parquet(fs, part, rows, columns)
    elif part.format == "csv":
        yield from _csv(fs, part, rows, column_types or {})
    elif part.format == "npy":
        yield from _npy(fs, part, rows)
    elif part.format == "images":
        yield from _images(fs, part, rows, image, image_dtype or np.dtype(np.float32))
    else:
        raise InvalidInputError(f"format {part.format!r} unknown")


def _parquet(fs, part: Partition, rows: int, columns: list[str] | None) -> Iterator:
    import pyarrow.parquet as pq

    groups = list(part.row_groups) or None
    if is_local(fs):  # Arrow's own file reader: no Python call per read
        pf = pq.ParquetFile(part.path)
        yield from pf.iter_batches(batch_size=rows, row_groups=groups, columns=columns, use_threads=False)
        return
    with fs.open(part.path, "rb") as f:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(batch_size=rows, row_groups=groups, columns=columns, use_threads=False)


def _csv(fs, part: Partition, rows: int, column_types: dict) -> Iterator:
    import pyarrow.csv as pcsv

    with fs.open(part.path, "rb") as f:
        reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False),
                               convert_options=pcsv.ConvertOptions(column_types=column_types))
        for batch in reader:
            for start in range(0, batch.num_rows, rows):
                yield batch.slice(start, rows)


def _npy(fs, part: Partition, rows: int) -> Iterator:
    import pyarrow as pa

    with fs.open(part.path, "rb") as f:
        shape, fortran, dtype = npy_header(f)
        if fortran and len(shape) > 1:
            raise InvalidInputError(f"input file {part.rel}: Fortran-ordered arrays cannot be streamed by row")
        if dtype.hasobject:
            raise InvalidInputError(f"input file {part.rel}: object arrays are pickles; refused")
        width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = width * dtype.itemsize
        left = shape[0]
        while left:
            n = min(rows, left)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise InvalidInputError(
                    f"input file {part.rel}: truncated: the header promises {shape[0]} rows, the data "
                    f"ends after {shape[0] - left + len(data) // max(row_bytes, 1)}"
                )
            flat = np.frombuffer(data, dtype=dtype)
            values = pa.array(flat.astype(dtype.newbyteorder("="), copy=False))
            yield pa.RecordBatch.from_arrays([pa.FixedSizeListArray.from_arrays(values, width)], [NPY_COLUMN])
            left -= n


def _images(fs, part: Partition, rows: int, image: ImageShape | None, dtype: np.dtype) -> Iterator:
    import pyarrow as pa
    from PIL import Image, UnidentifiedImageError

    if image is None:
        raise InvalidInputError("format images needs a model input shaped like an image")
    mode = "RGB" if image.c == 3 else "L"
    for start in range(0, len(part.images), rows):
        chunk = part.images[start:start + rows]
        out = np.empty((len(chunk), image.h, image.w, image.c), dtype=np.uint8)
        for i, (path, rel, _) in enumerate(chunk):
            try:
                with fs.open(path, "rb") as f:
                    img = Image.open(f).convert(mode).resize((image.w, image.h), Image.BILINEAR)
                    out[i] = np.asarray(img).reshape(image.h, image.w, image.c)
            except (UnidentifiedImageError, OSError) as exc:
                raise InvalidInputError(f"input file {rel}: not a readable image: {exc}") from None
        arr = out.transpose(0, 3, 1, 2) if image.layout == "chw" else out
        arr = np.ascontiguousarray(arr).reshape(len(chunk), -1)
        if dtype.kind == "f":
            arr = arr.astype(dtype) / dtype.type(255)
        else:
            arr = arr.astype(dtype, copy=False)
        values = pa.array(arr.reshape(-1))
        yield pa.RecordBatch.from_arrays(
            [pa.FixedSizeListArray.from_arrays(values, arr.shape[1]), pa.array([lab for _, _, lab in chunk])],
            [IMAGE_COLUMN, IMAGE_LABEL_COLUMN],
        )
