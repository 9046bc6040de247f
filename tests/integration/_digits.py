"""A SQLite registry holding the trained digits model in production, as
`make run` leaves it; what several tests deploy from."""

from __future__ import annotations

from pathlib import Path


def digits_in_production(home: Path, digits_model) -> tuple[str, str]:
    """Register ``digits_model`` (the ``digits_model`` fixture's training
    result) in a registry under ``home`` and promote it to production;
    (registry URI, artifacts folder)."""
    from flywheel.registry import Registry
    from flywheel.training.digits import register_digits

    uri, artifacts = f"sqlite:///{home}/registry.db", str(home / "artifacts")
    reg = Registry.open(uri, artifacts)
    try:
        mv = register_digits(reg, digits_model, actor="tests", epochs=3)
        reg.promote("digits", mv.version, "staging", actor="tests")
        reg.promote("digits", mv.version, "production", actor="tests")
    finally:
        reg.close()
    return uri, artifacts
