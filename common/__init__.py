"""What serving, training, the loops and the CLI share: process settings (the
one place environment variables are read), starting or joining Ray, the
installed version, whether every node reaches the registry and the artifact
store, and reading validated YAML files.

It may know Ray (imported lazily, on start), but imports no other Flywheel
room except ``protocol`` (for the error vocabulary).
"""

from flywheel.common.ray_cluster import check_cluster_versions, start_ray
from flywheel.common.reach import check_reachable
from flywheel.common.settings import Settings, load_settings
from flywheel.common.version import flywheel_version
from flywheel.common.yaml_files import load_yaml

__all__ = ["Settings", "check_cluster_versions", "check_reachable", "flywheel_version", "load_settings", "load_yaml", "start_ray"]
