"""The console's files as the ingress serves them (no browser, no Ray): every
module a page imports is served with a type a browser runs, every route of
the shell has its page module, nothing reaches outside the server (no CDN),
and only the file types a browser asks for are served.
(The pages themselves run in a real Chromium: tests/integration/test_console_browser.py.)
"""

from __future__ import annotations

import posixpath
import re
from importlib import resources

import pytest

from flywheel.serving._private.console_ui import ConsoleFiles
from flywheel.serving._private.http_server import Request

STATIC_IMPORT = re.compile(r"""(?:^|\n)\s*import\s[^"']*?from\s+["']([^"']+)["']""")
ASSET = re.compile(r"""(?:src|href)="/console/([^"#?]+)\"""")


def _names() -> list[str]:
    """Every file shipped under flywheel/serving/console/, by its path there."""
    out, stack = [], [("", resources.files("flywheel.serving") / "console")]
    while stack:
        prefix, folder = stack.pop()
        for item in folder.iterdir():
            if item.is_dir():
                stack.append((f"{prefix}{item.name}/", item))
            else:
                out.append(f"{prefix}{item.name}")
    return out


def _get(files: ConsoleFiles, path: str):
    parts = path.split("/")
    return files.serve(Request("GET", "/console/" + path), parts)


@pytest.fixture(scope="module")
def files():
    return ConsoleFiles()


def _text(files, name: str) -> str:
    status, body, _ = _get(files, name)
    assert status == 200, name
    return body.decode()


def test_the_index_and_every_asset_it_names_are_served(files):
    status, body, ctype = files.serve(Request("GET", "/console/"), [""])
    assert (status, ctype) == (200, b"text/html; charset=utf-8")
    assets = ASSET.findall(body.decode())
    assert {"app.js", "console.css"} <= set(assets)
    for name in assets:
        assert _get(files, name)[0] == 200, name


def test_every_module_imported_is_served_as_javascript(files):
    seen, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        status, body, ctype = _get(files, name)
        assert (status, ctype) == (200, b"text/javascript; charset=utf-8"), name
        for target in STATIC_IMPORT.findall(body.decode()):
            assert target.startswith("./") or target.startswith("../"), f"{name} imports {target!r}"
            todo.append(posixpath.normpath(posixpath.join(posixpath.dirname(name), target)))
    assert {"lib/api.js", "lib/dom.js"} <= seen


def test_every_route_of_the_shell_has_its_page_module(files):
    shell = _text(files, "app.js")
    routes = re.search(r"const ROUTES = \{(.*?)\};", shell, re.S).group(1)
    pages = set(re.findall(r'"(\w+)"', routes))
    assert {"models", "model", "lineage", "endpoint", "endpoints", "drift", "jobs", "job", "audit"} <= pages
    for page in pages:
        module = _text(files, f"pages/{page}.js")
        assert "export default" in module and "mount(view, ctx)" in module, page


def test_nothing_is_fetched_from_outside_the_server(files):
    # the SVG namespace is a name, not a request
    for name in _names():
        status, body, _ = _get(files, name)
        assert status == 200, name  # every shipped file is served
        text = body.decode(errors="replace").replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//cdn|@import", text), name


def test_the_key_is_kept_in_the_tab_session_only(files):
    for name in _names():
        text = _get(files, name)[1].decode(errors="replace")
        assert "localStorage" not in text and "document.cookie" not in text, name


@pytest.mark.parametrize("path", ["nope.js", "pages/nope.js", "pages/../../serving/__init__.py", "lib"])
def test_an_unknown_file_is_404(files, path):
    status, body, _ = _get(files, path)
    assert status == 404
    assert b"no console file" in body


def test_only_reading_is_allowed(files):
    status, body, _ = files.serve(Request("POST", "/console/app.js"), ["app.js"])
    assert status == 405
    assert b"GET, HEAD" in body
