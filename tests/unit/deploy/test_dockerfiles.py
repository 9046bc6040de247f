"""The images' Dockerfiles, read as text: they install through the one script
the packaging test runs (deploy/install.sh), run as a non-root user, check
readiness on the V2 route and serve by default. (The CPU image is also built
and run: tests/integration/test_container_image.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> list[tuple[str, str]]:
    return instructions(request.param)


def test_the_base_image_is_pinned_to_a_tag(dockerfile):
    [(_, base)] = [i for i in dockerfile if i[0] == "FROM"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base), base


def test_flywheel_is_installed_by_the_install_script_from_the_wheel(dockerfile):
    runs = [args for word, args in dockerfile if word == "RUN"]
    assert any("deploy/install.sh" in a or "/tmp/flywheel/install.sh" in a for a in runs)
    assert not any(re.search(r"pip install\b", a) for a in runs)  # no second install path


def test_every_copied_file_but_the_built_wheel_is_in_the_repository(dockerfile):
    for word, args in dockerfile:
        if word == "COPY":
            *sources, _ = args.split()
            for src in sources:
                if not src.startswith("dist/"):
                    assert (ROOT / src).exists(), src


def test_the_image_runs_as_a_non_root_user(dockerfile):
    users = [args for word, args in dockerfile if word == "USER"]
    assert users[-1] not in ("root", "0")


def test_the_healthcheck_asks_the_v2_readiness_route(dockerfile):
    [(_, check)] = [i for i in dockerfile if i[0] == "HEALTHCHECK"]
    assert "/v2/health/ready" in check


def test_the_entry_point_runs_flywheel_serve(dockerfile):
    [(_, entry)] = [i for i in dockerfile if i[0] == "ENTRYPOINT"]
    assert entry == '["flywheel", "serve"]'


def test_ray_auth_mode_is_set_explicitly(dockerfile):
    env = " ".join(args for word, args in dockerfile if word == "ENV")
    assert re.search(r"\bRAY_AUTH_MODE=\w+", env)


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_wheel_version_the_images_copy_is_the_projects(dockerfile):
    [(_, arg)] = [i for i in dockerfile if i[0] == "ARG" and i[1].startswith("VERSION=")]
    assert arg == f"VERSION={_project_version()}"


def test_the_kubernetes_manifests_name_this_versions_image_and_serve_config():
    import yaml

    version = _project_version()
    for name in ("rayservice.yaml", "rayjob-train.yaml"):
        text = (ROOT / "deploy" / "kubernetes" / name).read_text()
        tags = set(re.findall(r"image: flywheel-ml:([\w.-]+)", text))
        assert tags, (name, tags)
        assert all(t == version or t.startswith(f"{version}-") for t in tags), (name, tags)
    [service] = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "rayservice.yaml").read_text())
                 if d and d["kind"] == "RayService"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["flywheel_version"] == version
