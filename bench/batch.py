"""Batch inference benchmark: Flywheel's batch predict against the floor and plain Ray Data.

    python -m flywheel.bench.batch [--rows 2000000] [--files 16] [--cores N]
        [--models mlp,heavy] [--systems floor,raydata,flywheel]
        [--workdir /tmp/fw-batch-bench] [--out bench/results/batch]

One invocation, the same Parquet data for every system (``id`` int64 and
``f0..f63`` float32, written once under --workdir and reused while its size
matches), two ONNX models built here (input ``x`` [-1, 64], output ``y``):

- **mlp**: the demo digits MLP's shape (training/digits.py HPARAMS),
  freshly initialised;
- **heavy**: an MLP 64 -> 1024 -> 1024 -> 1024 -> 10, about 130x the
  demo's FLOPs per row, so that scoring, not I/O, sets the pace.

Each system reads every file, scores every row and writes Parquet (the id
and the model output), timed end to end, one after the other:

- **floor**: one process on one core, ONNX Runtime with one intra-op and one
  inter-op thread, pyarrow record batches of 8,192 rows in (no reader
  threads), pq.ParquetWriter out (no dictionary encoding of the floats): the
  rate one core can reach; "floor x cores" scales it to the machine;
- **raydata**: ``ray.data.read_parquet(...).map_batches(OrtUDF,
  compute=ActorPoolStrategy(size=cores), batch_size=8192, num_cpus=1)
  .write_parquet(...)`` with a straightforward ONNX Runtime UDF;
- **flywheel**: ``flywheel.batch.predict`` with one actor per core, one CPU
  and one ONNX Runtime thread each.

Ray (local, no dashboard) is started once after the floors with cores + 1
logical CPUs (Ray Data's listing, read and write tasks need one beside a pool
holding every core, or the plain pipeline never starts), warmed up with a tiny
job, and shared by raydata and flywheel. Peak memory is the summed RSS of
this process and all its child processes (Ray's daemons and workers),
sampled every 0.2 s from a quiet start; object-store pages count once per
process that maps them, so it is an upper bound. Every output is checked: its ids are
exactly the input's, and on the first file the scores equal the floor's
within 1e-5. Prints a table per model with the issue's targets (flywheel
within 1.25x of floor x cores; ahead of plain Ray Data) and writes
batch.json and batch.png to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import threading
import time

import numpy as np

from flywheel.training.digits import HPARAMS as DIGITS_HPARAMS

FEATURES = 64
CLASSES = 10
BATCH_ROWS = 8192
ROW_GROUP = 65_536  # several row groups per file, so a system may split a file
SYSTEMS = ("floor", "raydata", "flywheel")
MODELS: dict[str, list[int]] = {
    "mlp": [DIGITS_HPARAMS["in_features"], *DIGITS_HPARAMS["hidden"], DIGITS_HPARAMS["out_features"]],
    "heavy": [FEATURES, 1024, 1024, 1024, CLASSES],
}
TARGET_VS_FLOOR = 1.25  # flywheel may be at most this many times slower than floor x cores
ATOL = 1e-5


# -- data and models ------------------------------------------------------------------------------

def make_data(folder: str, rows: int, files: int, features: int = FEATURES, seed: int = 0) -> list[str]:
    """``files`` Parquet files in ``folder`` holding ``rows`` rows in all:
    ``id`` (int64, 0..rows-1 in file order) and ``f0..f{features-1}``
    (float32, standard normal). Files already there with the same shape are
    kept (a manifest beside the folder records it); otherwise the folder is
    replaced."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = folder.rstrip("/") + ".json"
    want = {"rows": rows, "files": files, "features": features, "seed": seed, "row_group": ROW_GROUP}
    paths = [os.path.join(folder, f"part-{i:05d}.parquet") for i in range(files)]
    if os.path.exists(manifest) and all(os.path.exists(p) for p in paths):
        with open(manifest) as f:
            if json.load(f) == want and len(os.listdir(folder)) == files:
                return paths
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for i, path in enumerate(paths):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        # (features, n): each feature a contiguous row, so Arrow takes it without a copy
        x = np.random.default_rng(seed + i).standard_normal((features, hi - lo), dtype=np.float32)
        cols = {"id": pa.array(np.arange(lo, hi, dtype=np.int64))}
        cols.update({f"f{j}": pa.array(x[j]) for j in range(features)})
        pq.write_table(pa.table(cols), path, row_group_size=ROW_GROUP)
    with open(manifest, "w") as f:
        json.dump(want, f)
    return paths


def mlp_weights(widths: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W [in, out], b [out]) per layer, He-initialised so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
             (rng.standard_normal(b) * 0.01).astype(np.float32)) for a, b in zip(widths, widths[1:])]


def numpy_forward(weights: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The reference forward pass: Linear/ReLU stacks, no ReLU after the last."""
    for i, (w, b) in enumerate(weights):
        x = x @ w + b
        if i < len(weights) - 1:
            x = np.maximum(x, 0)
    return x


def flops_per_row(widths: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(widths, widths[1:]))


def build_model(widths: list[int], path: str, seed: int = 0) -> str:
    """An MLP of ``widths`` as ONNX at ``path`` (Gemm/Relu; input ``x``
    [batch, widths[0]], output ``y`` [batch, widths[-1]], FP32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, prev = [], [], "x"
    weights = mlp_weights(widths, seed)
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(weights) - 1
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what the installed ONNX Runtime reads
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    onnx.save(model, path)
    return path


def ort_session(path: str):
    """One ONNX Runtime session on one thread: the unit every system scales."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# -- the systems ----------------------------------------------------------------------------------

def run_floor(model: str, files: list[str], out: str, features: list[str], batch_rows: int = BATCH_ROWS) -> int:
    """Score ``files`` in this process, one output file per input file in
    ``out`` (``id``, ``y`` as a fixed-size list); the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sess = ort_session(model)
    width = sess.get_outputs()[0].shape[1]
    schema = pa.schema([("id", pa.int64()), ("y", pa.list_(pa.float32(), width))])
    os.makedirs(out, exist_ok=True)
    rows = 0
    for i, path in enumerate(files):
        # one core, as tight as it goes: no Arrow reader threads, no dictionary
        # attempts on float outputs, columns stacked then transposed in one copy
        with pq.ParquetWriter(os.path.join(out, f"part-{i:05d}.parquet"), schema, use_dictionary=False) as writer:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["id", *features],
                                                        use_threads=False):
                x = np.ascontiguousarray(np.stack([rb.column(f).to_numpy() for f in features]).T)
                y = sess.run(None, {"x": x})[0]
                scores = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), width)
                writer.write_batch(pa.record_batch([rb.column("id"), scores], schema=schema))
                rows += rb.num_rows
    return rows


class OrtUDF:
    """The Ray Data UDF a user would write: a session per actor, the feature
    columns stacked into the model's input per batch."""

    def __init__(self, model: str, features: list[str]):
        self.sess = ort_session(model)
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([batch[f] for f in self.features], axis=1)
        return {"id": batch["id"], "y": self.sess.run(None, {"x": x})[0]}


def run_raydata(model: str, data: str, out: str, features: list[str], cores: int) -> None:
    import ray.data

    ds = ray.data.read_parquet(data).map_batches(
        OrtUDF, fn_constructor_kwargs={"model": model, "features": features}, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cores), batch_size=BATCH_ROWS, num_cpus=1)
    ds.write_parquet(out)


def run_flywheel(model: str, data: str, out: str, features: list[str], cores: int):
    from flywheel.batch import predict

    return predict(model, data, out, actors=cores, num_cpus=1, threads=1, progress=False, overwrite=True,
                   columns={"x": features}, keys=["id"])


# -- measuring and checking -----------------------------------------------------------------------

class MemorySampler:
    """Summed RSS (MiB) of this process and its descendants, every ``period``
    seconds on a thread, while in the ``with`` block: ``start`` and ``peak``."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self.start = self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @staticmethod
    def sample() -> float:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # it ended while we looked
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> MemorySampler:
        self.start = self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def settle(timeout: float = 15.0, quiet: float = 1.0) -> None:
    """Wait until this process's descendants have stayed the same for
    ``quiet`` seconds (the last system's actors have exited), at most
    ``timeout``: each system's memory is measured from a quiet start."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        pids = frozenset(p.pid for p in me.children(recursive=True))
        if pids != last:
            last, since = pids, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)


def output_files(folder: str) -> list[str]:
    """The Parquet files a system wrote (leaving out ``_``/``.`` bookkeeping)."""
    found = glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)
    rel = (os.path.relpath(p, folder).split(os.sep) for p in found)
    return sorted(p for p, parts in zip(found, rel) if not any(s.startswith(("_", ".")) for s in parts))


def score_matrix(table, skip: set[str]) -> np.ndarray:
    """The model output in ``table`` as [rows, width]: its floating columns
    (plain, list, fixed-size list or Ray's tensor extension) not in ``skip``,
    side by side in file order."""
    import pyarrow as pa

    parts = []
    for name in table.column_names:
        if name in skip:
            continue
        arr = table.column(name).combine_chunks()
        if isinstance(arr, pa.ExtensionArray):
            arr = arr.storage
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            if pa.types.is_floating(arr.type.value_type):
                parts.append(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1))
        elif pa.types.is_floating(arr.type):
            parts.append(arr.to_numpy(zero_copy_only=False).reshape(-1, 1))
    if not parts:
        raise ValueError(f"no floating-point output column among {table.column_names}")
    return np.hstack(parts)


def check_output(folder: str, rows: int, reference: tuple[np.ndarray, np.ndarray], features: list[str]) -> dict:
    """Whether ``folder`` holds ids 0..rows-1 once each, and the largest
    difference from the reference scores (``ids``, ``y``) on those ids."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    files = output_files(folder)
    if not files:
        return {"ok": False, "problem": "no Parquet files written"}
    ds = pds.dataset(files, format="parquet")
    ids = np.sort(ds.to_table(columns=["id"]).column("id").to_numpy())
    if len(ids) != rows or not np.array_equal(ids, np.arange(rows)):
        return {"ok": False, "problem": f"{len(ids)} rows, {len(np.unique(ids))} distinct ids; wanted 0..{rows - 1}"}
    ref_ids, ref_y = reference
    part = ds.to_table(filter=(pc.field("id") >= int(ref_ids[0])) & (pc.field("id") <= int(ref_ids[-1])))
    order = np.argsort(part.column("id").to_numpy())
    y = score_matrix(part, {"id", *features})[order]
    if y.shape != ref_y.shape:
        return {"ok": False, "problem": f"scores of shape {y.shape}, the floor's {ref_y.shape}"}
    diff = float(np.abs(y - ref_y).max())
    return {"ok": diff <= ATOL, "max_abs_diff": diff, **({} if diff <= ATOL else {"problem": f"max |diff| {diff:.2e}"})}


def read_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of one floor output file, sorted by id."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    order = np.argsort(t.column("id").to_numpy())
    return t.column("id").to_numpy()[order], score_matrix(t, {"id"})[order]


def verdicts(rates: dict[str, float], cores: int) -> dict:
    """The issue's two targets from rows/s per system: flywheel within
    TARGET_VS_FLOOR of floor x cores; flywheel ahead of plain Ray Data.
    A target whose systems were not run is None."""
    out: dict = {"floor_x_cores": rates["floor"] * cores if "floor" in rates else None,
                 "vs_floor": None, "vs_raydata": None}
    fw = rates.get("flywheel")
    if fw and out["floor_x_cores"]:
        slower = out["floor_x_cores"] / fw
        out["vs_floor"] = {"floor_x_cores_over_flywheel": slower, "met": slower <= TARGET_VS_FLOOR}
    if fw and rates.get("raydata"):
        ahead = fw / rates["raydata"]
        out["vs_raydata"] = {"flywheel_over_raydata": ahead, "met": ahead > 1.0}
    return out


# -- the run --------------------------------------------------------------------------------------

def _measure(label: str, fn) -> dict:
    print(f"[{label}] running ...", flush=True)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    print(f"[{label}] {seconds:.1f} s, peak RSS {mem.peak:,.0f} MiB", flush=True)
    return {"seconds": seconds, "peak_rss_mib": mem.peak, "start_rss_mib": mem.start, "result": result}


def _start_ray(cores: int, warm_dir: str, model: str, features: list[str]) -> None:
    import msgspec
    import ray.data

    from flywheel.common import load_settings, start_ray

    # A local Ray, whatever RAY_ADDRESS says: the bench owns the machine. One logical CPU more
    # than the scoring actors take: Ray Data's ListFiles, read and write tasks ask for a CPU
    # each (ListFiles cannot be told otherwise), and with the pool holding every CPU the plain
    # pipeline waits for one forever.
    start_ray(msgspec.structs.replace(load_settings(), ray_address=""), num_cpus=cores + 1, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    print("[ray] warming up with a tiny job ...", flush=True)
    data = os.path.join(warm_dir, "data")
    make_data(data, 4 * cores * 64, cores)
    run_raydata(model, data, os.path.join(warm_dir, "out"), features, cores)
    shutil.rmtree(os.path.join(warm_dir, "out"), ignore_errors=True)


def _fmt_rate(r: float) -> str:
    return f"{r:,.0f}"


def print_table(model: str, widths: list[int], rows: int, cores: int, results: list[dict], verdict: dict) -> None:
    arch = " -> ".join(map(str, widths))
    print(f"\n{model}: MLP {arch}, {flops_per_row(widths) / 1e6:.3f} MFLOP/row, {rows:,} rows, {cores} cores")
    print(f"{'system':<14}{'rows/s':>12}{'seconds':>9}{'peak RSS MiB':>14}{'at start':>10}"
          f"{'actor peak':>12}{'/ floor x cores':>17}  check")
    fxc = verdict["floor_x_cores"]
    for r in results:
        ratio = f"{r['rows_per_s'] / fxc:.2f}" if fxc else "-"
        actor = f"{r['report']['peak_rss_mb']:,.0f}" if r.get("report") else "-"
        check = "ok" if r["check"]["ok"] else "WRONG: " + r["check"]["problem"]
        print(f"{r['system']:<14}{_fmt_rate(r['rows_per_s']):>12}{r['seconds']:>9.1f}{r['peak_rss_mib']:>14,.0f}"
              f"{r['start_rss_mib']:>10,.0f}{actor:>12}{ratio:>17}  {check}")
        if r["system"] == "floor":
            print(f"{'floor x cores':<14}{_fmt_rate(fxc):>12}{'1.00':>62}")
        if r.get("steady_rows_per_s"):
            ratio = f"{r['steady_rows_per_s'] / fxc:.2f}" if fxc else "-"
            print(f"{'  scoring only':<14}{_fmt_rate(r['steady_rows_per_s']):>12}{ratio:>62}")
    print("peak RSS: this process and every Ray process, summed; actor peak: flywheel's report.peak_rss_mb;\n"
          "scoring only: flywheel's rows over its actors' time scoring partitions (no start-up)")
    v = verdict["vs_floor"]
    if v:
        print(f"flywheel within {TARGET_VS_FLOOR}x of floor x cores: {'yes' if v['met'] else 'no'} "
              f"(floor x cores / flywheel = {v['floor_x_cores_over_flywheel']:.2f}x)")
    v = verdict["vs_raydata"]
    if v:
        print(f"flywheel ahead of plain Ray Data: {'yes' if v['met'] else 'no'} "
              f"(flywheel / raydata = {v['flywheel_over_raydata']:.2f}x)")


def _plot(results: list[dict], verdicts_by_model: dict, cores: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(verdicts_by_model)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    colors = {"floor": "#8c8c8c", "raydata": "#4c72b0", "flywheel": "#dd8452"}
    for ax, model in zip(axes[0], models):
        rs = [r for r in results if r["model"] == model]
        bars = ax.bar([r["system"] for r in rs], [r["rows_per_s"] for r in rs],
                      color=[colors[r["system"]] for r in rs])
        ax.bar_label(bars, [f"{r['rows_per_s']:,.0f}\n{r['peak_rss_mib']:,.0f} MiB" for r in rs], fontsize=7)
        fxc = verdicts_by_model[model]["floor_x_cores"]
        if fxc:
            ax.axhline(fxc, color="k", ls="--", lw=1, label=f"floor x {cores} cores")
            ax.axhline(fxc / TARGET_VS_FLOOR, color="k", ls=":", lw=1, label=f"target (/{TARGET_VS_FLOOR})")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"{model}: MLP {' -> '.join(map(str, MODELS[model]))}", fontsize=9)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.margins(y=0.15)
        ax.set_ylabel("rows/s (end to end)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("batch inference, read Parquet -> score -> write Parquet (bars: rows/s, peak RSS of all "
                 "processes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _names(raw: str, allowed, flag: str) -> list[str]:
    names = [n for n in raw.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"{flag}: {', '.join(bad) or 'nothing'} not among {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="scoring actors, and the floor's multiplier (default: all)")
    ap.add_argument("--models", default="mlp,heavy", help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--workdir", default="/tmp/fw-batch-bench", help="data, models and outputs (data is reused)")
    ap.add_argument("--out", default="bench/results/batch")
    args = ap.parse_args(argv)
    models = _names(args.models, MODELS, "--models")
    systems = [s for s in SYSTEMS if s in _names(args.systems, SYSTEMS, "--systems")]
    if args.rows < args.files or args.files < 1 or args.cores < 1:
        raise SystemExit("--rows >= --files >= 1 and --cores >= 1, please")
    if "flywheel" in systems:
        try:
            import flywheel.batch  # noqa: F401  (fail before the data is made, not after the floors)
        except ImportError as exc:
            raise SystemExit(f"flywheel.batch cannot be imported ({exc}); leave it out with --systems") from None
    features = [f"f{j}" for j in range(FEATURES)]

    t0 = time.perf_counter()
    data = os.path.join(args.workdir, "data")
    files = make_data(data, args.rows, args.files)
    print(f"data: {args.rows:,} rows x {FEATURES} float32 in {args.files} files under {data} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    paths = {m: build_model(MODELS[m], os.path.join(args.workdir, "models", f"{m}.onnx")) for m in models}

    def out_dir(model: str, system: str) -> str:
        d = os.path.join(args.workdir, "out", model, system)
        shutil.rmtree(d, ignore_errors=True)
        return d

    runs: list[dict] = []
    # the floors first, before Ray's processes exist to share the cores
    for m in models:
        if "floor" in systems:
            m_out = out_dir(m, "floor")
            runs.append({"model": m, "system": "floor", "out": m_out,
                         **_measure(f"floor {m}", lambda: run_floor(paths[m], files, m_out, features))})
    ray_systems = [s for s in systems if s != "floor"]
    if ray_systems:
        import ray

        try:
            _start_ray(args.cores, os.path.join(args.workdir, "warm"), paths[models[0]], features)
            for m in models:
                for s in ray_systems:
                    fn = run_raydata if s == "raydata" else run_flywheel
                    s_out = out_dir(m, s)
                    settle()
                    runs.append({"model": m, "system": s, "out": s_out, **_measure(
                        f"{s} {m}", lambda: fn(paths[m], data, s_out, features, args.cores))})
        finally:
            ray.shutdown()

    print("checking outputs ...", flush=True)
    results, by_model, wrong = [], {}, False
    for m in models:
        # the first input file's scores, from the floor when it ran, else from ONNX Runtime directly
        ref_dir = os.path.join(args.workdir, "out", m, "floor")
        if "floor" not in systems:
            run_floor(paths[m], files[:1], ref_dir, features)
        reference = read_reference(os.path.join(ref_dir, "part-00000.parquet"))
        for run in (r for r in runs if r["model"] == m):
            res = run.pop("result")
            row = {k: v for k, v in run.items() if k != "out"}
            row.update(rows=args.rows, rows_per_s=args.rows / run["seconds"],
                       check=check_output(run["out"], args.rows, reference, features))
            if run["system"] == "flywheel":
                row["report"] = {k: getattr(res, k) for k in ("rows", "seconds", "rows_per_s", "actors",
                                                              "peak_rss_mb", "nodes", "busy_s")}
                # the rate once the actors are up: rows over the actors' scoring time
                row["steady_rows_per_s"] = res.rows / (res.busy_s / res.actors) if res.busy_s else 0.0
                row["report"]["failed"] = len(res.failed)
                if res.rows != args.rows or res.failed:
                    row["check"] = {"ok": False, "problem": f"report: {res.rows:,} rows, {len(res.failed)} "
                                                            f"partitions failed"}
            wrong |= not row["check"]["ok"]
            results.append(row)
        rates = {r["system"]: r["rows_per_s"] for r in results if r["model"] == m}
        by_model[m] = verdicts(rates, args.cores)
        print_table(m, MODELS[m], args.rows, args.cores, [r for r in results if r["model"] == m], by_model[m])

    os.makedirs(args.out, exist_ok=True)
    config = {"rows": args.rows, "files": args.files, "cores": args.cores, "cpu_count": os.cpu_count(),
              "features": FEATURES, "batch_rows": BATCH_ROWS, "row_group": ROW_GROUP,
              "models": {m: {"widths": MODELS[m], "flops_per_row": flops_per_row(MODELS[m])} for m in models}}
    with open(os.path.join(args.out, "batch.json"), "w") as f:
        json.dump({"config": config, "results": results, "verdicts": by_model}, f, indent=1)
    _plot(results, by_model, args.cores, os.path.join(args.out, "batch.png"))
    print(f"\nwrote {args.out}/batch.json and {args.out}/batch.png")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
