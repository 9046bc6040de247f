"""Flywheel loops: the continuous-training controller.

A loop keeps one endpoint fresh: triggers (schedule, drift, new data,
performance, manual) start a training job on original and captured data, the
candidate is evaluated beside production, the registry's gates and approvals
decide, and a canary on the running endpoint promotes it or rolls it back.
Every step is an audit entry carrying the loop-run id.
"""

from flywheel.loops.spec import LoopData, LoopSpec, parse_loop

__all__ = ["LoopData", "LoopSpec", "parse_loop"]
