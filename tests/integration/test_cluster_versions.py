"""Joining a Ray cluster whose workers run another Flywheel stops at once,
naming both versions (a real remote task reads the workers' version)."""

from __future__ import annotations

import pytest

import flywheel.common.ray_cluster
from flywheel.protocol.errors import ConfigError
from flywheel.common.ray_cluster import check_cluster_versions

pytestmark = pytest.mark.integration


def test_a_cluster_running_this_flywheel_passes(ray_session):
    check_cluster_versions()


def test_a_cluster_running_another_flywheel_is_refused_naming_both(ray_session, monkeypatch):
    theirs = flywheel.common.ray_cluster.flywheel_version()
    # this driver claims another version; the workers report their installed one
    monkeypatch.setattr(flywheel.common.ray_cluster, "flywheel_version", lambda: "9.9.9")
    with pytest.raises(ConfigError, match=rf"this process runs Flywheel 9\.9\.9, but the Ray cluster's nodes run "
                                          rf"another \([\d.]+: Flywheel {theirs}\)"):
        check_cluster_versions()
