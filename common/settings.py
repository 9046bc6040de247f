"""The one place Flywheel reads environment variables (a test enforces it).

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
    home: Flywheel's local state folder (``FLYWHEEL_HOME``, default
        ``./.flywheel``): the default registry and artifact store live there.
    registry_uri: the model registry (``FLYWHEEL_REGISTRY_URI``; default a
        SQLite file in ``home``; ``postgresql://...`` for a cluster).
    artifacts_uri: the artifact store (``FLYWHEEL_ARTIFACTS_URI``; default
        ``home``/artifacts; any fsspec URI).
    actor: who is acting, for the audit log (``FLYWHEEL_ACTOR``, else ``USER``).
    api_key: the token ``flywheel bench`` and a training job's canary
        hand-off (``export.canary_url``) send to a server with auth on
        (``FLYWHEEL_API_KEY``; from the environment, never a scenario file).
    ray_usage_stats: Ray's usage reporting (``RAY_USAGE_STATS_ENABLED``);
        off (``0``) unless set.
    mlserver_venv: the virtual environment with MLServer that the latency
        bench compares against (``FLYWHEEL_MLSERVER_VENV``).
    alibi_venv: the virtual environment with alibi-detect that the drift
        bench compares against (``FLYWHEEL_ALIBI_VENV``).
    kserve_venv: the virtual environment with KServe that the latency bench
        compares against (``FLYWHEEL_KSERVE_VENV``).
    bench_debug: benchmarks print the traceback of a system that failed to
        start (``FLYWHEEL_BENCH_DEBUG`` non-empty).
    gloo_socket_ifname: the network interface a training worker's gloo
        binds (``GLOO_SOCKET_IFNAME``, torch's own variable); empty = the
        interface holding the worker's Ray node address (training/torch_backend.py).
    log_format: ``text`` (default) or ``json``: the server's log records as
        one JSON object per line (``FLYWHEEL_LOG_FORMAT``; common/log_format.py).
    """

    ray_address: str = ""
    ray_auth_mode: str = "disabled"
    ray_tmpdir: str = ""
    ray_num_cpus: int = 0
    http_host: str = ""
    http_port: int = 0
    home: str = ".flywheel"
    registry_uri: str = ""
    artifacts_uri: str = ""
    actor: str = "unknown"
    api_key: str = ""
    ray_usage_stats: str = "0"
    mlserver_venv: str = ".venv-mlserver"
    alibi_venv: str = ".venv-alibi"
    kserve_venv: str = ".venv-kserve"
    bench_debug: bool = False
    gloo_socket_ifname: str = ""
    log_format: str = "text"

    def __repr__(self) -> str:  # never print the key
        return "Settings(" + ", ".join(
            f"{f}={'***' if f == 'api_key' and getattr(self, f) else repr(getattr(self, f))}"
            for f in self.__struct_fields__
        ) + ")"


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

    log_format = (env.get("FLYWHEEL_LOG_FORMAT", "") or "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ValueError(f"environment variable FLYWHEEL_LOG_FORMAT={log_format!r} must be 'text' or 'json'")
    home = os.path.abspath(os.path.expanduser(env.get("FLYWHEEL_HOME", "") or ".flywheel"))
    return Settings(
        home=home,
        registry_uri=env.get("FLYWHEEL_REGISTRY_URI", "") or f"sqlite://{home}/registry.db",
        artifacts_uri=env.get("FLYWHEEL_ARTIFACTS_URI", "") or os.path.join(home, "artifacts"),
        actor=env.get("FLYWHEEL_ACTOR", "") or env.get("USER", "") or "unknown",
        ray_address=env.get("RAY_ADDRESS", ""),
        ray_auth_mode=env.get("RAY_AUTH_MODE", "") or "disabled",
        ray_tmpdir=env.get("RAY_TMPDIR", ""),
        ray_num_cpus=_int("FLYWHEEL_RAY_NUM_CPUS"),
        http_host=env.get("FLYWHEEL_HTTP_HOST", ""),
        http_port=_int("FLYWHEEL_HTTP_PORT"),
        api_key=env.get("FLYWHEEL_API_KEY", ""),
        ray_usage_stats=env.get("RAY_USAGE_STATS_ENABLED", "") or "0",
        mlserver_venv=env.get("FLYWHEEL_MLSERVER_VENV", "") or ".venv-mlserver",
        alibi_venv=env.get("FLYWHEEL_ALIBI_VENV", "") or ".venv-alibi",
        kserve_venv=env.get("FLYWHEEL_KSERVE_VENV", "") or ".venv-kserve",
        bench_debug=bool(env.get("FLYWHEEL_BENCH_DEBUG", "")),
        gloo_socket_ifname=env.get("GLOO_SOCKET_IFNAME", ""),
        log_format=log_format,
    )
