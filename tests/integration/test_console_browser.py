"""The web console in a real browser: Debian's headless Chromium driven by
Selenium, against one real deployment (Ray Serve, real HTTP, API keys on).

Each page loads with no console errors and is photographed under
bench/results/console/; a canary started here is seen advancing step by
step on the endpoint page; an admin's Approve click reaches the registry
and the audit page; a predict-role key is refused; a revoked key is signed
out once the servers reload the keys. Pages wait on the DOM (polling with
a deadline), never on time.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from flywheel.registry import Registry, parse_policy
from flywheel.registry.keys import KeyStore
from flywheel.registry.types import Lineage
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import AuthConfig, DriftConfig, EndpointConfig, RegistryConfig
from flywheel.serving.policy_config import FixedPolicy
from flywheel.training.jobs import JobStore

from _poll import wait_for
from _router_models import rows, table_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "console"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_session"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                              "apt-get install chromium chromium-driver, or `make system-deps`"),
]

KEYS = (("alice", "admin"), ("ops", "operate"), ("app", "predict"), ("leaver", "operate"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One deployment for the whole file: a registry model ``fraud`` (two
    versions, one approval needed for production), an endpoint ``m`` of two
    variants (drift watched on 1), a queued training job with two epochs."""
    home = tmp_path_factory.mktemp("console-browser")
    registry = RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art"))
    models = {v: table_model(home / f"v{v}.onnx", 100, v) for v in (1, 2)}
    reg = Registry.open(registry.uri, registry.artifacts, cache_dir=str(home / "cache"))
    for v in (1, 2):
        lineage = Lineage(data_fingerprint=f"{v:064x}", code_commit="c0ffee", parent="fraud/1" if v == 2 else "",
                          job_id="job1" if v == 2 else "")
        reg.register_version("fraud", {"model.onnx": models[v]}, actor="tests", metrics={"accuracy": 0.9 + v / 100},
                             lineage=lineage)
    reg.set_policy("fraud", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="tests")
    reg.close()
    keys = KeyStore.open(registry.uri)
    made = {name: keys.create(name, [role], actor="tests") for name, role in KEYS}
    keys.close()
    job_dir = home / "job"
    job_dir.mkdir()
    (job_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "val_accuracy": 0.6 + e / 10}) + "\n"
        for e in range(2)))
    (job_dir / "log.txt").write_text("epoch 0 done\nepoch 1 done\n")
    jobs = JobStore.open(registry.uri)
    jobs.submit({"name": "digits"}, name="digits", priority=0, storage=str(job_dir), job_id="job1")
    jobs.close()
    reference = rows(200, np.random.default_rng(0))
    reference[:, 1] += 3.0  # feature 1 of the traffic lies far from it: every scored window flags
    np.save(home / "reference.npy", reference)
    drift = DriftConfig(enabled=True, sample_rate=1.0, batch_rows=5, flush_interval_s=0.2, window=10,
                        reference=str(home / "reference.npy"))
    cfg = DeployConfig(
        name="console-browser",
        models=[ModelConfig(name="m", version="1", path=models[1], num_cpus=0.05, drift=drift),
                ModelConfig(name="m", version="2", path=models[2], num_cpus=0.05)],
        endpoints=[EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))],
        server=ServerConfig(port=0, grpc_port=-1, auth=AuthConfig(enabled=True, reload_interval_s=0.5)),
        registry=registry,
    )
    dep = deploy(cfg)
    try:
        yield {"url": dep.url, "registry": registry, "job_dir": job_dir, "keys": {n: k for n, (k, _) in made.items()},
               "tokens": {n: t for n, (_, t) in made.items()}}
    finally:
        undeploy(dep)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--window-size=1280,1400",
                # everything but loopback goes to a dead proxy: a page that
                # reached for a CDN would fail here, with a console error
                "--proxy-server=http://127.0.0.1:9"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        yield driver
    finally:
        if driver is not None:
            driver.quit()  # also stops chromedriver
        else:
            service.stop()


def _call(site, method: str, path: str, key: str, body=None):
    url = urlsplit(site["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {site['tokens'][key]}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _text(driver, css: str) -> str:
    # read in one script call: a live page may replace the element between
    # a lookup and a read (a stale element in Selenium's terms)
    return driver.execute_script(
        "const el = document.querySelector(arguments[0]);"
        "return el ? (el.innerText ?? el.textContent) : '';", css)


def _sign_in(driver, site, key: str, route: str) -> None:
    """A fresh tab session on ``route``, signed in with ``key``."""
    driver.get(f"{site['url']}/console/#/{route}")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    field = wait_for(lambda: driver.find_elements("css selector", "#key"), 15, "the sign-in form")[0]
    field.send_keys(site["tokens"][key])
    driver.find_element("css selector", "#sign-in-button").click()
    wait_for(lambda: driver.find_elements("css selector", "#sign-out"), 15, f"signed in as {key}")


def _open(driver, site, route: str, page: str) -> None:
    """Go to ``route`` and wait until its page rendered its first answer."""
    driver.get(f"{site['url']}/console/#/{route}")
    wait_for(lambda: driver.execute_script(
        "const v = document.querySelector('#view[data-ready]');"
        "return v !== null && v.dataset.page === arguments[0] && v.dataset.route === arguments[1];", page, f"#/{route}"),
        15, f"page {page} rendered ({route})")


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _infer(site, n: int, rng, version: str = "") -> None:
    path = f"/v2/models/m/versions/{version}/infer" if version else "/v2/models/m/infer"
    for _ in range(n):
        x = rows(1, rng)
        status, body = _call(site, "POST", path, "app", {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body


def test_a_predict_key_is_refused_and_no_key_reads_nothing(site, browser):
    browser.get(f"{site['url']}/console/#/models")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(lambda: browser.find_elements("css selector", "#key"), 15, "the sign-in form")
    browser.find_element("css selector", "#key").send_keys(site["tokens"]["app"])
    browser.find_element("css selector", "#sign-in-button").click()
    message = wait_for(lambda: "refused" in (t := _text(browser, "#sign-in-message")) and t, 15, "the refusal")
    assert "operate" in message
    assert browser.execute_script("return sessionStorage.length") == 0  # the refused key is not kept
    assert not browser.find_elements("css selector", "#view")
    # auth is on: going on without a key ends at the sign-in form again
    browser.find_element("css selector", "#no-key").click()
    message = wait_for(lambda: "no longer accepts" in (t := _text(browser, "#sign-in-message")) and t, 15,
                       "signed out for want of a key")
    assert "401" in message or "key" in message


def test_a_canary_is_seen_advancing_step_by_step_on_the_endpoint_page(site, browser):
    _sign_in(browser, site, "ops", "endpoints/m")
    wait_for(lambda: browser.find_elements("css selector", "#view[data-page='endpoint'][data-ready='1']"), 15,
             "the endpoint page")
    assert _text(browser, "#canary") == "No canary has run on this endpoint."
    rng = np.random.default_rng(1)
    _infer(site, 5, rng)
    status, body = _call(site, "POST", "/v2/endpoints/m/canary", "ops", {
        "variant": "2", "baseline": "1", "steps": [20, 50, 100], "hold_s": 1.5, "promote": False,
        "gates": {"min_requests": 2, "max_p99_ratio": None, "max_error_rate_increase": 1.0}})
    assert status == 200, body
    seen: list[str] = []

    def finished() -> bool:
        _infer(site, 5, rng)  # the gates need requests on both variants at each step
        shown = browser.execute_script(
            "const c = document.querySelector('#canary[data-step]');"
            "return c ? [c.dataset.step, c.dataset.status] : null;")
        if shown is None:
            return False
        if not seen or seen[-1] != shown[0]:
            seen.append(shown[0])
        return shown[1] == "completed"

    wait_for(finished, 60, "the canary to complete on the page", every_s=0.1)
    assert len(seen) >= 2, seen  # at least two distinct steps shown, one after the other
    assert seen == sorted(seen, key=int), seen
    assert _text(browser, "#canary-percent") == "100 %"
    history = _text(browser, "#canary-history")
    assert "advance" in history and "to 100 %" in history, history
    assert "error_rate" in _text(browser, "#gates")
    _shot(browser, "endpoint")


def test_shadow_agreement_is_shown_on_the_endpoint_page(site, browser):
    _sign_in(browser, site, "ops", "endpoints/m")
    _open(browser, site, "endpoints/m", "endpoint")
    routed = _call(site, "GET", "/v2/endpoints/m", "ops")[1]["weights"]
    shadow = "1" if routed.get("2") == 1.0 else "2"  # mirror to the variant not answering
    status, body = _call(site, "PUT", "/v2/endpoints/m/shadow", "ops", {"variant": shadow, "fraction": 1.0})
    assert status == 200, body
    rng = np.random.default_rng(3)
    try:
        def compared() -> str:
            _infer(site, 5, rng)
            return _text(browser, "#shadow tbody td:first-child") == shadow and _text(browser, "#shadow")

        table = wait_for(compared, 30, f"shadow comparisons of {shadow} on the page", every_s=0.2)
        assert "Agreement" in table, table
        assert "mirrored to" in _text(browser, "#view"), _text(browser, "#view")
    finally:
        assert _call(site, "DELETE", "/v2/endpoints/m/shadow", "ops")[0] == 200


def test_each_page_loads_without_console_errors(site, browser):
    rng = np.random.default_rng(2)

    def flagged() -> bool:
        _infer(site, 10, rng, version="1")  # one drift window's worth
        return bool(_call(site, "GET", "/v2/drift/m?version=1", "ops")[1]["flagged"])

    wait_for(flagged, 30, "a drift window of m/1 flagged")
    _sign_in(browser, site, "ops", "models")
    browser.get_log("browser")  # drop what the sign-in logged
    pages = [
        ("models", "models", "#models", "fraud"),
        ("models/fraud", "model", "#versions", "approvals"),
        ("lineage/fraud/2", "lineage", "#lineage-graph", "job1"),
        ("endpoints", "endpoints", "#endpoints", "m"),
        ("endpoints/m", "endpoint", "#variants", "ready"),
        ("drift/m/1", "drift", "#flagged", "ks"),
        ("jobs", "jobs", "#jobs", "job1"),
        ("jobs/job1", "job", "#log", "epoch 1 done"),
        ("audit", "audit", "#audit", "key.create"),
    ]
    for route, page, marker, expected in pages:
        _open(browser, site, route, page)
        assert browser.find_elements("css selector", marker), f"{route}: no {marker}"
        assert expected in _text(browser, marker), (route, _text(browser, marker))
        assert _severe(browser) == [], route
        if page == "lineage":  # version, parent, data, code and job, joined by edges
            assert len(browser.find_elements("css selector", "#lineage-graph .node")) >= 5
            assert browser.find_elements("css selector", "#lineage-graph line")
        _shot(browser, route.replace("/", "-"))


def test_an_admin_approval_reaches_the_registry_and_the_audit_page(site, browser):
    _sign_in(browser, site, "ops", "models/fraud")
    _open(browser, site, "models/fraud", "model")
    # an operate key is shown the button but the server refuses it, and the page says why
    browser.find_element("css selector", "button.approve[data-version='1']").click()
    message = wait_for(lambda: "admin" in (t := _text(browser, "#action-message")) and t, 15, "the refusal")
    assert message.startswith("Not approved"), message
    _sign_in(browser, site, "alice", "models/fraud")
    _open(browser, site, "models/fraud", "model")
    browser.find_element("css selector", "button.approve[data-version='2']").click()
    message = wait_for(lambda: "approved by" in (t := _text(browser, "#action-message")) and t, 15, "the approval")
    assert "key:alice" in message
    status, body = _call(site, "GET", "/v2/registry/models/fraud", "ops")
    assert status == 200, body
    assert [a["actor"] for a in body["versions"][1]["approvals"]] == ["key:alice"]
    assert body["versions"][1]["gates"] == []
    wait_for(lambda: "key:alice" in _text(browser, "tr[data-version='2'] .approvals"), 15,
             "the approval shown on the model page")
    _open(browser, site, "audit", "audit")
    browser.find_element("css selector", "#filter-actor").send_keys("key:alice")
    browser.find_element("css selector", "#filter-action").send_keys("approve")
    browser.find_element("css selector", "#filter-apply").click()
    shown = wait_for(lambda: browser.execute_script(
        "return document.querySelector('#view[data-ready][data-route*=\"actor=\"]') &&"
        " [...document.querySelectorAll('#audit tbody tr')].map((r) => [r.dataset.actor, r.dataset.action]);"),
        15, "the filtered audit page")
    assert shown == [["key:alice", "approve"]], shown
    row = _text(browser, "#audit tr[data-action='approve']")
    assert "fraud" in row and "approved in the console" in row, row
    _shot(browser, "audit-approval")


def test_an_admin_cancels_a_queued_job(site, browser):
    _sign_in(browser, site, "alice", "jobs/job1")
    _open(browser, site, "jobs/job1", "job")
    assert _text(browser, "#job-state") == "queued"
    points = "return document.querySelectorAll('#view svg.chart circle').length"
    before = browser.execute_script(points)
    # what a running job writes next: the page shows it without a reload
    with open(site["job_dir"] / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 0.3, "val_loss": 0.4, "val_accuracy": 0.8}) + "\n")
    with open(site["job_dir"] / "log.txt", "a") as f:
        f.write("epoch 2 done\n")
    wait_for(lambda: "epoch 2 done" in _text(browser, "#log"), 15, "the new log line on the page")
    assert browser.execute_script(points) == before + 3  # loss, validation loss, validation accuracy
    browser.find_element("css selector", "#cancel-job").click()
    wait_for(lambda: _text(browser, "#job-state") == "cancelled", 15, "the job shown cancelled")
    status, body = _call(site, "GET", "/v2/jobs/job1", "ops")
    assert (status, body["job"]["state"]) == (200, "cancelled")


def test_a_revoked_key_is_signed_out(site, browser):
    _sign_in(browser, site, "leaver", "endpoints")
    _open(browser, site, "endpoints", "endpoints")
    keys = KeyStore.open(site["registry"].uri)
    try:
        keys.revoke(site["keys"]["leaver"].id, actor="tests")
    finally:
        keys.close()
    # the servers reload keys every 0.5 s and the page polls every second
    message = wait_for(lambda: "no longer accepts" in (t := _text(browser, "#sign-in-message")) and t, 30,
                       "the revoked key signed out")
    assert "Sign in again" in message
    assert browser.execute_script("return sessionStorage.getItem('flywheel.key')") is None
