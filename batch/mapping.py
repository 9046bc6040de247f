"""Which columns make each model input, checked against a file's schema
before the run starts, and the conversion of a record batch to input arrays.

A model input ``[-1, d1, d2, ...]`` takes per row ``d1 * d2 * ...`` values,
from that many scalar columns (in the order given) or from one list column
of that width. A mismatch names the file, the column and what was expected.
"""

from __future__ import annotations

import fnmatch
import math

import msgspec
import numpy as np

from flywheel.batch.job import RESERVED
from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import InvalidInputError
from flywheel.runtime.signature import Signature


class InputPlan(msgspec.Struct, frozen=True):
    """How one model input is built: ``columns`` (scalars, in order) or a
    single list column (``list_column``), reshaped to ``row_shape``."""

    name: str
    datatype: str
    row_shape: tuple[int, ...]
    columns: tuple[str, ...] = ()
    list_column: str = ""

    @property
    def needed(self) -> tuple[str, ...]:
        return (self.list_column,) if self.list_column else self.columns


def _kind(t) -> str:
    """numeric | bool | text | list | other, for an Arrow type."""
    import pyarrow.types as pt

    if pt.is_integer(t) or pt.is_floating(t):
        return "int" if pt.is_integer(t) else "float"
    if pt.is_boolean(t):
        return "bool"
    if pt.is_string(t) or pt.is_large_string(t) or pt.is_binary(t) or pt.is_large_binary(t):
        return "text"
    if pt.is_fixed_size_list(t) or pt.is_list(t) or pt.is_large_list(t):
        return "list"
    if pt.is_dictionary(t):
        return _kind(t.value_type)
    if pt.is_null(t):  # a CSV with a header and no rows: no type to judge yet
        return "null"
    return "other"


def _fits(kind: str, datatype: str) -> bool:
    """Can values of ``kind`` feed a ``datatype`` input without losing meaning?"""
    if kind == "null":
        return True
    if datatype == "BYTES":
        return kind == "text"
    if datatype == "BOOL":
        return kind == "bool"
    if datatype.startswith("FP"):
        return kind in ("int", "float", "bool")
    return kind in ("int", "bool")  # integers: a float column would be truncated


def _expand(patterns: list[str], names: list[str], where: str, input_name: str) -> list[str]:
    out = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)] if any(c in pat for c in "*?[") else \
            ([pat] if pat in names else [])
        if not hits:
            raise InvalidInputError(f"{where}: column {pat!r} (columns.{input_name}) is not there; "
                                    f"it has {names[:12]}{' ...' if len(names) > 12 else ''}")
        out.extend(h for h in hits if h not in out)
    return out


def plan_inputs(schema, signature: Signature, where: str, *, columns: dict[str, list[str]],
                exclude: set[str]) -> list[InputPlan]:
    """The plan for every model input against one file's ``schema``.

    where: the file, for messages. exclude: key, label and partition columns,
    never fed to the model unless mapped by name.
    """
    names = list(schema.names)
    types = {f.name: f.type for f in schema}
    unknown = sorted(set(columns) - {t.name for t in signature.inputs})
    if unknown:
        raise InvalidInputError(f"columns: {unknown[0]!r} is not an input of the model; its inputs are "
                                f"{[t.name for t in signature.inputs]}")
    plans = []
    for spec in signature.inputs:
        if not spec.shape or spec.shape[0] != -1:
            raise InvalidInputError(f"model input {spec.name!r} has shape {list(spec.shape)}; batch inference "
                                    "needs a variable first (batch) dimension")
        row_shape = tuple(spec.shape[1:])
        if any(d < 0 for d in row_shape):
            raise InvalidInputError(f"model input {spec.name!r} has shape {list(spec.shape)}; batch inference "
                                    "needs every dimension but the first fixed")
        width = math.prod(row_shape)
        expected = f"{spec.datatype} x {width} per row (shape {list(spec.shape)})"
        if spec.name in columns:
            chosen = _expand(columns[spec.name], names, where, spec.name)
        elif spec.name in types:
            chosen = [spec.name]
        elif len(signature.inputs) == 1:
            chosen = [n for n in names if n not in exclude and n not in RESERVED and _kind(types[n]) != "text"]
            lists = [n for n in chosen if _kind(types[n]) == "list"]
            if len(lists) == 1 and len(chosen) == 1:
                pass
            elif lists:
                raise InvalidInputError(f"{where}: list columns {lists} beside others; map model input "
                                        f"{spec.name!r} with columns.{spec.name}")
        else:
            raise InvalidInputError(f"{where}: no column named {spec.name!r} for model input {spec.name!r} "
                                    f"({expected}); map it with columns.{spec.name}")
        plans.append(_check(spec, chosen, types, where, width, row_shape, expected))
    return plans


def _check(spec, chosen: list[str], types: dict, where: str, width: int, row_shape: tuple[int, ...],
           expected: str) -> InputPlan:
    import pyarrow.types as pt

    if len(chosen) == 1 and _kind(types[chosen[0]]) == "list":
        col, t = chosen[0], types[chosen[0]]
        if pt.is_fixed_size_list(t) and t.list_size != width:
            raise InvalidInputError(f"{where}: column {col!r} holds {t.list_size} values per row; model input "
                                    f"{spec.name!r} expects {expected}")
        if not _fits(_kind(t.value_type), spec.datatype):
            raise InvalidInputError(f"{where}: column {col!r} holds {t.value_type} values; model input "
                                    f"{spec.name!r} expects {expected}")
        return InputPlan(spec.name, spec.datatype, row_shape, list_column=col)
    for col in chosen:
        kind = _kind(types[col])
        if kind == "list":
            raise InvalidInputError(f"{where}: column {col!r} is a list column among scalar ones for model "
                                    f"input {spec.name!r}")
        if not _fits(kind, spec.datatype):
            raise InvalidInputError(f"{where}: column {col!r} is {types[col]}; model input {spec.name!r} expects "
                                    f"{expected} (name it in keys to carry it through instead)")
    if len(chosen) != width:
        raise InvalidInputError(
            f"{where}: model input {spec.name!r} expects {expected}; {len(chosen)} column(s) would feed it: "
            f"{chosen[:8]}{f' and {len(chosen) - 8} more' if len(chosen) > 8 else ''}. Map it with columns.{spec.name}"
        )
    return InputPlan(spec.name, spec.datatype, row_shape, columns=tuple(chosen))


def to_inputs(batch, plans: list[InputPlan], where: str) -> dict[str, np.ndarray]:
    """The model's input arrays for one record batch."""
    n = batch.num_rows
    out = {}
    for plan in plans:
        dtype = numpy_dtype(plan.datatype)
        if plan.list_column:
            col = batch.column(plan.list_column)
            _no_nulls(col, plan.list_column, where)
            width = math.prod(plan.row_shape)
            if hasattr(col, "value_lengths"):  # a variable list: every row must hold exactly width values
                lengths = col.value_lengths().to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(lengths != width)
                if bad.size:
                    raise InvalidInputError(f"{where}: column {plan.list_column!r} holds {int(lengths[bad[0]])} "
                                            f"values at row {int(bad[0])} of this batch; model input {plan.name!r} "
                                            f"expects {width} per row")
            values = col.flatten()
            if values.null_count:
                raise InvalidInputError(f"{where}: column {plan.list_column!r} has empty (null) values inside its "
                                        f"lists (model input {plan.name!r})")
            arr = _numpy(values, dtype).reshape(n, *plan.row_shape)
        elif dtype.kind == "O":
            arr = np.empty((n, len(plan.columns)), dtype=object)
            for j, name in enumerate(plan.columns):
                col = batch.column(name)
                _no_nulls(col, name, where)
                arr[:, j] = _numpy(col, dtype)
            arr = arr.reshape(n, *plan.row_shape)
        else:
            cols = []
            for name in plan.columns:
                col = batch.column(name)
                _no_nulls(col, name, where)
                cols.append(_numpy(col, dtype))
            # columns side by side, then one transposing copy: four times
            # faster than filling a row-major array a column at a time
            arr = np.ascontiguousarray(np.stack(cols).T).reshape(n, *plan.row_shape)
        out[plan.name] = arr
    return out


def _numpy(col, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "O":
        return np.array(col.to_pylist(), dtype=object)
    import pyarrow as pa
    import pyarrow.types as pt

    if pt.is_dictionary(col.type):
        col = col.dictionary_decode()
    try:
        arr = col.to_numpy()  # a view where Arrow can give one: 30x cheaper than a copy
    except pa.ArrowInvalid:  # booleans (bit-packed), and the like
        arr = col.to_numpy(zero_copy_only=False)
    return arr.astype(dtype, copy=False)


def _no_nulls(col, name: str, where: str) -> None:
    if col.null_count:
        first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
        raise InvalidInputError(f"{where}: column {name!r} is empty (null) at row {first} of this batch")
