"""deploy/Dockerfile built and run with podman (Debian's package), and one
inference answered from inside the container.

No container registry is reachable here, so the Dockerfile's base image is a
stand-in built by the test from Debian's packages (debootstrap: the same
Debian release and Python 3.11 as the official slim image, pip allowed to
install system-wide as there) and tagged with the base image's name; the
Dockerfile itself is built unchanged. Podman runs with a private storage and
a containers.conf of the test's own: runc, and resource limits this sandbox
grants (crun asks for more than root may set here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _example import check_example_answer
from _ports import answers, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker.io/library/python:3.11-slim-bookworm"
IMAGE = "localhost/flywheel-ml:test"
TOOLS = ("podman", "debootstrap", "runc")


def _missing() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    bool(_missing()) or os.geteuid() != 0,
    reason=f"needs root and {', '.join(TOOLS)} (make test installs them as root with apt-get)",
)]


def _debian_mirror() -> str:
    """The http(s) Debian mirror this machine's apt uses (skip when none)."""
    release = re.search(r"^VERSION_CODENAME=(\w+)", Path("/etc/os-release").read_text(), re.M)
    if not Path("/etc/debian_version").exists() or release is None:
        pytest.skip("not a Debian machine: no Debian mirror to build the stand-in base from")
    entries = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        entries += path.read_text().split("\n\n")
    for entry in entries:
        uris = re.search(r"^URIs:\s*(\S+)", entry, re.M)
        suites = re.search(r"^Suites:\s*(.+)$", entry, re.M)
        if uris and suites and release.group(1) in suites.group(1).split() and uris.group(1).startswith("http"):
            return uris.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(https?://\S+)\s+{release.group(1)}\s", listing.read_text(), re.M)
        if m:
            return m.group(1)
    pytest.skip("no http(s) Debian mirror in this machine's apt sources")


def _mounts_under(path: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(str(path))), reverse=True)


class Podman:
    def __init__(self, work: Path) -> None:
        conf = work / "containers.conf"
        conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                        '[engine]\nruntime = "runc"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "run")]

    def __call__(self, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        assert proc.returncode == 0, f"podman {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


@pytest.fixture(scope="module")
def podman():
    work = Path(tempfile.mkdtemp(prefix="fw-podman-", dir="/var/tmp"))
    engine = Podman(work)
    try:
        # root in an unprivileged container may have podman but not the
        # namespaces and mounts it needs: say so rather than fail
        probe = subprocess.run(["unshare", "-m", "-p", "-f", "true"], capture_output=True, text=True, timeout=60)
        info = subprocess.run([*engine.base, "info"], env=engine.env, capture_output=True, text=True, timeout=120)
        if probe.returncode != 0 or info.returncode != 0:
            pytest.skip(f"podman cannot run containers here: {(probe.stderr + info.stderr).strip()[-500:]}")
        yield engine, work
    finally:
        subprocess.run([*engine.base, "rm", "-af", "-t", "5"], env=engine.env, capture_output=True, timeout=120)
        subprocess.run([*engine.base, "rmi", "-af"], env=engine.env, capture_output=True, timeout=120)
        for point in _mounts_under(work):  # what a debootstrap cut short left mounted
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(podman):
    """Debian bookworm with Python 3.11, as the official slim image has."""
    engine, work = podman
    rootfs = work / "rootfs"
    mirror = _debian_mirror()
    boot = subprocess.Popen(["debootstrap", "--variant=minbase",
                             "--include=python3,python3-pip,python3-venv,ca-certificates",
                             "bookworm", str(rootfs), mirror],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = boot.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(boot.pid, signal.SIGTERM)  # its exit trap unmounts /proc and /sys of the rootfs
        boot.communicate(timeout=60)
        raise
    assert boot.returncode == 0, f"debootstrap failed:\n{out[-3000:]}"
    # as in the official image: pip installs system-wide, python3 in /usr/local/bin
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    for name, target in (("python3", "/usr/bin/python3"), ("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        (rootfs / "usr/local/bin" / name).symlink_to(target)
    # apt inside the build uses this machine's mirror; pip trusts this machine's extra CAs
    (rootfs / "etc/apt/sources.list").write_text(f"deb {mirror} bookworm main\n")
    for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
    subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True, capture_output=True, timeout=120)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        engine("import", "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
               "--change", "ENV LANG=C.UTF-8", "-", BASE, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        try:
            tar.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tar.kill()
            tar.wait()
    assert tar.returncode == 0
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE


@pytest.fixture(scope="module")
def image(podman, base_image, tmp_path_factory):
    """The image, built from a context that holds what deploy/Dockerfile
    copies: the wheel, the lock and the install script."""
    engine, _ = podman
    context = tmp_path_factory.mktemp("context")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(context / "dist")], check=True, timeout=300)
    shutil.copy(ROOT / "requirements.lock", context / "requirements.lock")
    (context / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "install.sh", context / "deploy" / "install.sh")
    # the repository's allowlist: the build must find what it copies through it
    shutil.copy(ROOT / ".dockerignore", context / ".dockerignore")
    # host networking: the build's pip and apt reach the registries as this
    # machine does, and podman makes no bridge or firewall rules for it
    engine("build", "--pull=never", "--network=host", "--format", "docker",
           "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", IMAGE, str(context), timeout=1200)
    return IMAGE


def test_the_image_runs_as_a_non_root_user_with_a_readiness_healthcheck(podman, image):
    engine, _ = podman
    info = json.loads(engine("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "flywheel"
    check = _healthcheck(info)
    assert check is not None, f"no health check in {sorted(info)} / {sorted(config)}"
    assert "/v2/health/ready" in " ".join(check["Test"])
    assert config["Entrypoint"] == ["flywheel", "serve"]


def test_the_image_serves_the_packaged_example_and_answers_an_inference(podman, image):
    engine, _ = podman
    port, grpc_port = free_port(), free_port()
    engine("run", "-d", "--name", "fw-test", "--network=host", "--pull=never", image,
           "--config", "example", "--port", str(port), "--grpc-port", str(grpc_port))
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: answers(f"{url}/v2/health/ready"), 180, "the container to be ready")
        except AssertionError as exc:
            logs = subprocess.run([*engine.base, "logs", "fw-test"], env=engine.env, capture_output=True, text=True)
            raise AssertionError(f"{exc}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}") from None
        check_example_answer(url)
        assert engine("exec", "fw-test", "id", "-u").stdout.strip() == "1000"
    finally:
        subprocess.run([*engine.base, "rm", "-f", "-t", "10", "fw-test"], env=engine.env, capture_output=True,
                       timeout=120)


def _healthcheck(node):
    """The image's health check, wherever this podman version reports it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.lower() == "healthcheck" and isinstance(value, dict) and value.get("Test"):
                return value
            found = _healthcheck(value)
            if found is not None:
                return found
    return None

