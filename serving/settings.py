"""The one place Flywheel reads environment variables.

Everything else receives these values as arguments. Read with
:func:`load_settings`, which has no side effects beyond reading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec


class Settings(msgspec.Struct, frozen=True):
    """Process-level settings.

    ray_address: an existing Ray cluster to join (``RAY_ADDRESS``); empty starts
        a local Ray.
    ray_auth_mode: Ray's token auth (``RAY_AUTH_MODE``). Ray 2.60 turns token auth
        on when this is unset and warns on every start, so we always set it:
        ``disabled`` by default for a loopback quickstart.
    ray_tmpdir: Ray's session folder (``RAY_TMPDIR``); empty = Ray's default.
    ray_num_cpus: logical CPUs for a local Ray (``FLYWHEEL_RAY_NUM_CPUS``); 0 = all.
    http_host / http_port: override the config's HTTP address
        (``FLYWHEEL_HTTP_HOST`` / ``FLYWHEEL_HTTP_PORT``); empty/0 = keep it.
    """

    ray_address: str = ""
    ray_auth_mode: str = "disabled"
    ray_tmpdir: str = ""
    ray_num_cpus: int = 0
    http_host: str = ""
    http_port: int = 0


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``environ`` (``os.environ`` by default)."""
    env = os.environ if environ is None else environ

    def _int(key: str) -> int:
        raw = env.get(key, "").strip()
        if not raw:
            return 0
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} must be an integer") from None

    return Settings(
        ray_address=env.get("RAY_ADDRESS", ""),
        ray_auth_mode=env.get("RAY_AUTH_MODE", "") or "disabled",
        ray_tmpdir=env.get("RAY_TMPDIR", ""),
        ray_num_cpus=_int("FLYWHEEL_RAY_NUM_CPUS"),
        http_host=env.get("FLYWHEEL_HTTP_HOST", ""),
        http_port=_int("FLYWHEEL_HTTP_PORT"),
    )
