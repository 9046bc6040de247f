"""Flywheel batch inference: score files and data sets with the models the
registry serves, on Ray Data's actor pool.

``flywheel predict`` and :func:`predict` read Parquet, CSV, NumPy or image
folders (local or any fsspec URI), write one Parquet file per input partition
(atomically, so a re-run resumes where a crash stopped it) and, given a label
column, evaluate the model and can record that on its registry version.

Nothing heavy is imported here: Ray, pyarrow and the model runtimes load when
a run starts.
"""

from flywheel.batch.job import PredictJob, parse_job
from flywheel.batch.report import BatchReport, PartitionFailure
from flywheel.batch.runner import predict, run

__all__ = ["BatchReport", "PartitionFailure", "PredictJob", "parse_job", "predict", "run"]
