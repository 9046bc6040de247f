"""What every framework's converter shares: the result of a conversion, the
parity check against the original model, sample rows, and the finishing
touches that make a converted graph servable by the onnxruntime backend.

The converters themselves (from_sklearn.py, from_xgboost.py,
from_lightgbm.py) only load, convert and predict; everything a reader must
trust about the result (the parity figures, the signature, the provenance)
is decided here, once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, PreconditionFailedError
from flywheel.runtime.extras import require_extra
from flywheel.runtime.signature import Signature

# onnxmltools 1.16 converts up to opset 15 (its own check refuses more);
# skl2onnx follows the same number so every converted model needs the same
# runtime, which ONNX Runtime has supported since 1.10.
TARGET_OPSET = 15
INPUT_NAME = "input"
# tree sums in float32 (ONNX) against float32/float64 (the libraries): the
# differences seen are ~1e-7; 1e-4 leaves room for long ensembles while any
# wrong tree, objective or base score is off by far more
DEFAULT_TOLERANCE = 1e-4
GENERATED_ROWS = 64
# formats that run code when loaded: never read, whichever framework is named
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill")
EXTRA = "convert"


class Parity(msgspec.Struct, frozen=True):
    """How the ONNX model compared with the original on the sample rows.

    output: the ONNX output compared ("probabilities" or "predictions").
    rows: how many rows; sample: where they came from ("generated" or the
    file's name, or "given"); max_abs_diff: the largest absolute difference
    seen; tolerance: the largest allowed (absolute for values up to 1 in
    magnitude, relative to the value beyond)."""

    output: str
    rows: int
    sample: str
    max_abs_diff: float
    tolerance: float


class Converted(msgspec.Struct, frozen=True):
    """An ONNX model converted from another framework, checked for parity.

    onnx: the serialized model (input ``input`` FP32 [-1, n_features];
    classifiers give ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, k],
    regressors ``predictions`` FP32 [-1, 1]). source_file / source_sha256
    name what it was converted from ("" for an in-memory model)."""

    onnx: bytes
    signature: Signature
    framework: str
    framework_version: str
    converter: str
    task: str
    parity: Parity
    source_file: str = ""
    source_sha256: str = ""
    source_path: str = ""

    def metadata(self) -> dict[str, dict[str, Any]]:
        """The registry fields that record where the model came from and how
        well it matched: ``params``, ``tags`` and ``metrics``."""
        tags = {"source_framework": self.framework, "converted_by": self.converter}
        if self.source_file:
            tags["source_file"] = self.source_file
        if self.source_sha256:
            tags["source_sha256"] = self.source_sha256
        params = {"framework": self.framework, "framework_version": self.framework_version, "task": self.task,
                  "opset": TARGET_OPSET, "parity_output": self.parity.output, "parity_rows": self.parity.rows,
                  "parity_sample": self.parity.sample, "parity_tolerance": self.parity.tolerance}
        return {"params": params, "tags": tags, "metrics": {"parity_max_abs_diff": self.parity.max_abs_diff}}

    def register(self, registry: Any, name: str, *, actor: str, lineage: Any = None,
                 artifacts: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
                 params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> Any:
        """Register this model as a new version of ``name`` in ``registry`` (a
        flywheel.registry.Registry): ``model.onnx``, the source file as
        ``source<suffix>`` when there is one, and ``artifacts`` beside them;
        the signature; the provenance and parity figures (see :meth:`metadata`),
        under the caller's own ``metrics``/``params``/``tags``. Returns the
        ModelVersion; raises ConfigError when ``artifacts`` names one of ours."""
        files: dict[str, str | bytes] = {"model.onnx": self.onnx}
        if self.source_path:
            files["source" + os.path.splitext(self.source_path)[1].lower()] = self.source_path
        clash = sorted(set(files) & set(artifacts or {}))
        if clash:
            raise ConfigError(f"artifact name(s) {', '.join(clash)} are taken by the converted model")
        files.update(artifacts or {})
        meta = self.metadata()
        return registry.register_version(
            name, files, actor=actor, signature=msgspec.to_builtins(self.signature),
            metrics={**meta["metrics"], **(metrics or {})}, params={**meta["params"], **(params or {})},
            tags={**meta["tags"], **(tags or {})}, lineage=lineage)


class Framework(Protocol):
    """One framework's converter (a module of this package, registered by name
    in flywheel.runtime.convert). ``model`` is whatever ``load`` returns."""

    name: str
    suffixes: tuple[str, ...]  # the native files it reads; () when it reads none

    def load(self, path: str) -> Any: ...
    def task(self, model: Any) -> str: ...
    def n_features(self, model: Any) -> int: ...
    def thresholds(self, model: Any) -> list[list[float]] | None: ...
    def reference(self, model: Any, rows: np.ndarray) -> np.ndarray: ...
    def to_onnx(self, model: Any, n_features: int) -> Any: ...
    def versions(self) -> tuple[str, str]: ...


def need(modules: tuple[str, ...], what: str) -> list[Any]:
    """Import ``modules`` (the convert extra's), or raise ConfigError with the
    install command."""
    require_extra(EXTRA, modules, what)
    return [importlib.import_module(m) for m in modules]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_source(path: str, framework: Framework, flag: str) -> None:
    """Refuse a pickle, a missing file and a suffix the framework does not
    save natively, naming ``flag`` (the option or argument that gave it)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise ConfigError(
            f"{flag} {path!r}: a pickle ({suffix}) is never loaded: unpickling runs whatever code the file "
            f"holds. Save the model in {framework.name}'s own format instead ({', '.join(framework.suffixes)})")
    if suffix not in framework.suffixes:
        raise ConfigError(f"{flag} {path!r}: expected a {framework.name} model file ending in "
                          f"{' or '.join(framework.suffixes)}")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r}: no such file")


def load_sample(path: str, n_features: int) -> np.ndarray:
    """Rows for the parity check from a ``.npy`` file (read without pickles)
    or a ``.csv`` file of numbers (one header line allowed), as float32 of
    shape (rows, n_features). ConfigError naming the file otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            with open(path) as f:
                first = f.readline()
            try:
                np.array(first.strip().split(","), dtype=np.float64)
                skip = 0
            except ValueError:
                skip = 1  # a header line
            rows = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        else:
            raise ConfigError(f"sample file {path!r}: expected .npy or .csv")
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"sample file {path!r}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - numpy's reasons vary; the file is what is wrong
        raise ConfigError(f"sample file {path!r}: not readable as numbers: {exc}") from None
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != n_features:
        raise ConfigError(f"sample file {path!r}: expected rows of {n_features} features (shape [N, "
                          f"{n_features}], N >= 1), got shape {list(rows.shape)}")
    if not np.issubdtype(rows.dtype, np.number):
        raise ConfigError(f"sample file {path!r}: expected numbers, got {rows.dtype}")
    return rows.astype(np.float32)


def generated_rows(n_features: int, thresholds: Sequence[Sequence[float]] | None,
                   count: int = GENERATED_ROWS, seed: int = 0) -> np.ndarray:
    """Rows for the parity check when none are given: for a tree model, each
    feature takes values between and beyond its split thresholds, so every
    branch of every split is taken somewhere (values *at* a threshold are
    avoided: float32 against float64 thresholds may break such ties either
    way); otherwise standard normal values. Seeded: the same rows each time."""
    rng = np.random.default_rng(seed)
    if thresholds is None:
        return rng.standard_normal((count, n_features)).astype(np.float32)
    rows = np.zeros((count, n_features), dtype=np.float32)
    for j, cuts in enumerate(thresholds):
        t = np.unique(np.asarray(cuts, dtype=np.float64))
        if t.size == 0:
            continue  # a feature no tree splits on: any value does
        margin = max(1.0, float(np.abs(t).max()) * 0.1)
        values = np.concatenate([[t[0] - margin], (t[:-1] + t[1:]) / 2, [t[-1] + margin]])
        rows[:, j] = rng.choice(values, size=count)
    return rows


def finish(model: Any, task: str) -> Any:
    """Make a converted graph servable: one batch axis named ``N`` on every
    output (some converters write a fixed 1 there) and the regressor's output
    named ``predictions`` whatever the converter called it."""
    graph = model.graph
    if task == "regressor":
        old = graph.output[0].name
        for node in graph.node:
            for i, out in enumerate(node.output):
                if out == old:
                    node.output[i] = "predictions"
        graph.output[0].name = "predictions"
    for out in graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    return model


def check_parity(framework: Framework, model: Any, session: Any, rows: np.ndarray, task: str,
                 sample: str, tolerance: float) -> Parity:
    """Run the original and the ONNX model on ``rows`` and compare the
    classifier's probabilities (or the regressor's predictions). Raises
    PreconditionFailedError giving the largest difference and the tolerance
    when they disagree by more than ``tolerance``: absolute for values up to
    1 in magnitude, relative to the original's value beyond."""
    output = "probabilities" if task == "classifier" else "predictions"
    got = np.asarray(session.run([output], {INPUT_NAME: rows})[0], dtype=np.float64)
    want = np.asarray(framework.reference(model, rows), dtype=np.float64)
    if task == "classifier" and want.ndim == 1:
        want = np.stack([1.0 - want, want], axis=1)  # binary: the libraries give P(class 1) only
    if task == "regressor" and want.ndim == 1:
        want = want[:, None]
    if got.shape != want.shape:
        raise PreconditionFailedError(
            f"parity check failed: the ONNX model's {output} have shape {list(got.shape)}, {framework.name}'s "
            f"{list(want.shape)}, on {len(rows)} sample rows")
    gap = np.abs(got - want)
    diff = float(gap.max()) if gap.size else 0.0
    # absolute up to 1 (every probability), relative beyond: a regressor's
    # float32 sum of a few hundred is only exact to ~1e-5
    worst = float((gap / np.maximum(1.0, np.abs(want))).max()) if gap.size else 0.0
    if not worst <= tolerance:  # NaN fails too
        raise PreconditionFailedError(
            f"parity check failed: the ONNX model's {output} differ from {framework.name}'s by up to {diff:.3g} "
            f"(max abs diff) on {len(rows)} sample rows ({sample}); the tolerance is {tolerance:g} "
            "(absolute, relative for values beyond 1)")
    return Parity(output=output, rows=int(len(rows)), sample=sample, max_abs_diff=diff, tolerance=tolerance)


def convert(framework: Framework, model: Any, *, tolerance: float, sample: str | None = None,
            rows: np.ndarray | None = None, source_path: str = "", source_file: str = "",
            source_sha256_of: str = "") -> Converted:
    """Convert a loaded ``model``, check it against the original on ``rows``,
    else on the rows of ``sample`` (a .npy/.csv path), else on generated
    rows, and return the result. ``source_path`` is the file it was read
    from (hashed, and stored beside the model by ``register``);
    ``source_sha256_of`` a file only hashed (the code that built it).
    ConfigError on bad arguments or an unconvertible model,
    PreconditionFailedError on a parity failure."""
    if not (isinstance(tolerance, (int, float)) and np.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    task = framework.task(model)
    n = framework.n_features(model)
    if rows is not None:
        sample_name = "given"
    elif sample:
        rows, sample_name = load_sample(sample, n), os.path.basename(sample)
    else:
        rows, sample_name = generated_rows(n, framework.thresholds(model)), "generated"
    try:
        proto = framework.to_onnx(model, n)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converters' reasons are many; say whose and what
        raise ConfigError(f"{framework.name} model: the ONNX conversion failed: {type(exc).__name__}: {exc}") from None
    proto = finish(proto, task)
    (ort,) = need(("onnxruntime",), "checking a converted model")
    from flywheel.runtime.onnx_signature import read_onnx_signature

    data = proto.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        # the signature as serving will read it: from the file, by the same reader
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(data)
        signature = read_onnx_signature(path)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    parity = check_parity(framework, model, session, rows, task, sample_name, tolerance)
    version, converter = framework.versions()
    hashed = source_path or source_sha256_of
    return Converted(onnx=data, signature=signature, framework=framework.name, framework_version=version,
                     converter=converter, task=task, parity=parity, source_file=source_file,
                     source_sha256=sha256_file(hashed) if hashed else "", source_path=source_path)

