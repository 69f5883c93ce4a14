"""The operators' dashboard at /ui, in a real headless Chromium (Debian's
chromium and chromedriver, driven by selenium): refused without a platform
admin key, and with one every chart draws data from a running `strata serve`
that scaled from zero and served streamed and whole requests. A screenshot is
kept under target/e2e-artifacts/."""
import os
import time

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import Server, bearer

ARTIFACTS = os.environ.get("STRATA_ARTIFACTS", os.path.join(os.path.dirname(__file__), "../../target/e2e-artifacts"))
CHARTS = ["chart-load", "chart-tokens", "chart-replicas", "chart-cost", "chart-ttft", "chart-latency", "chart-tenants"]

CONFIG = """
[pool]
autoscale = true
min_replicas = 0
max_replicas = 1
slo_ttft_p95_ms = 1500.0
scale_to_zero_after_secs = 600.0

[pricing.gemma-3-270m-q4_k_m]
prompt_per_million = 0.5
completion_per_million = 1.5
"""


@pytest.fixture(scope="module")
def busy():
    """A strata serve that scaled from zero and served some requests."""
    s = Server(replicas=1, ready=0, config=CONFIG, tenant="dashboard-tenant")
    client = s.client()
    for i in range(3):
        stream = client.chat.completions.create(
            model="gemma-3-270m-q4_k_m", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.completions.create(model="gemma-3-270m-q4_k_m", prompt="The sky is", max_tokens=4)
    yield s
    s.stop()


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2600"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def log_in(driver, base, key):
    driver.get(f"{base}/ui")
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()


def test_without_an_admin_key_the_dashboard_and_its_data_are_refused(busy):
    r = httpx.get(f"{busy.base}/ui")
    assert r.status_code == 401 and 'name="key"' in r.text and "chart-load" not in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    r = httpx.get(f"{busy.base}/ui/data")
    assert r.status_code == 401 and r.json()["error"]["message"]
    # A tenant's key (even its admin) is not a platform admin key.
    r = httpx.post(f"{busy.base}/ui/login", data={"key": busy.key})
    assert r.status_code == 401 and "Refused" in r.text and "set-cookie" not in r.headers
    r = httpx.post(f"{busy.base}/ui/login", data={"key": "sk-strata-not-a-key"})
    assert r.status_code == 401 and "Refused" in r.text
    # A made-up session cookie is no session.
    r = httpx.get(f"{busy.base}/ui/data", cookies={"strata_ui": "0" * 64})
    assert r.status_code == 401
    # The refusals are audited: the member key's as its own, the key that
    # is not one with no actor.
    audit, after = [], 0
    while True:
        page = busy.admin("GET", f"/admin/v1/audit?after={after}&limit=1000", expect=200).json()
        audit += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert any(a["action"] == "ui.login" and a["result"] == "denied" for a in audit)
    assert any(a["action"] == "ui.login" and a["actor_key"] == "-" and a["result"] == "invalid_key" for a in audit)


def test_the_login_sets_a_strict_http_only_session_and_a_bad_window_is_a_400(busy):
    r = httpx.post(f"{busy.base}/ui/login", data={"key": busy.admin_key})
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and busy.admin_key not in cookie
    jar = {"strata_ui": r.cookies["strata_ui"]}
    assert httpx.get(f"{busy.base}/ui", cookies=jar).status_code == 200
    r = httpx.get(f"{busy.base}/ui/data?minutes=0", cookies=jar)
    assert r.status_code == 400 and r.json()["error"]["param"] == "minutes"
    data = httpx.get(f"{busy.base}/ui/data?minutes=15", cookies=jar).json()
    assert data["slo"]["ttft_p95_ms"] == 1500.0
    assert any(d["reason"] == "from_zero" for d in data["decisions"])
    spend = {t["name"]: t for t in data["tenants_spend"]}
    assert spend["dashboard-tenant"]["requests"] == 6 and spend["dashboard-tenant"]["cost_usd"] > 0
    # By model: its requests, what they were billed, its pool and replica.
    model = {m["model"]: m for m in data["models"]}["gemma-3-270m-q4_k_m"]
    assert model["requests"] == 6 and model["billed_usd"] == pytest.approx(spend["dashboard-tenant"]["cost_usd"])
    assert model["pools"] == ["default"] and model["replicas_running"] == 1 and model["instances_usd"] >= 0
    assert model["ttft_p95_ms"] is not None
    # Logging out ends the session.
    httpx.post(f"{busy.base}/ui/logout", cookies=jar)
    assert httpx.get(f"{busy.base}/ui/data", cookies=jar).status_code == 401
    # So does revoking the key it was made with.
    second = busy.admin("POST", "/admin/v1/tenants/ten_platform/keys", {"name": "ops", "role": "admin"}, expect=201).json()
    r = httpx.post(f"{busy.base}/ui/login", data={"key": second["key"]})
    jar = {"strata_ui": r.cookies["strata_ui"]}
    assert httpx.get(f"{busy.base}/ui/data", cookies=jar).status_code == 200
    busy.admin("DELETE", f"/admin/v1/tenants/ten_platform/keys/{second['id']}", expect=200)
    assert httpx.get(f"{busy.base}/ui/data", cookies=jar).status_code == 401


def test_the_dashboard_in_chromium_draws_every_chart_from_the_running_server(busy):
    os.makedirs(ARTIFACTS, exist_ok=True)
    driver = browser()
    try:
        log_in(driver, busy.base, busy.key)
        refused = WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.find_elements(By.CLASS_NAME, "refused"))
        assert "Refused" in refused[0].text
        assert not driver.find_elements(By.ID, "chart-load")

        log_in(driver, busy.base, busy.admin_key)
        # Asked by script, not through an element: the login's redirect
        # replaces the page (an element of the old one would be stale).
        WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script("return document.body && document.body.dataset.loaded") == "true")
        # Load samples come every 2 s; wait until each chart has drawn points.
        deadline = time.time() + 30
        while True:
            points = {c: int(driver.execute_script(f"return document.getElementById('{c}').dataset.points")) for c in CHARTS}
            if all(points.values()) or time.time() > deadline:
                break
            time.sleep(1)
        assert all(points.values()), points
        for c in CHARTS[:-1]:
            # Something visible: a line, or a dot for a lone point.
            assert driver.find_elements(By.CSS_SELECTOR, f"#{c} svg path.series[d*='L'], #{c} svg circle.dot"), c
        # The TTFT chart draws the pool's p95 objective.
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-ttft svg line.slo")
        assert "dashboard-tenant" in driver.find_element(By.ID, "chart-tenants").text
        assert "gemma-3-270m-q4_k_m" in driver.find_element(By.ID, "models").text
        decisions = driver.find_element(By.ID, "decisions").text
        assert "from_zero" in decisions and "0 → 1" in decisions
        tenants = driver.find_element(By.ID, "tenants").text
        assert "dashboard-tenant" in tenants and "member key" in tenants and "platform" in tenants
        # No secret reaches the page.
        source = driver.page_source
        assert busy.key not in source and busy.admin_key not in source
        path = os.path.join(ARTIFACTS, "dashboard.png")
        assert driver.save_screenshot(path)
        assert os.path.getsize(path) > 20_000

        driver.find_element(By.CSS_SELECTOR, "header form button").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "key"))
        driver.get(f"{busy.base}/ui")
        assert driver.find_elements(By.ID, "key") and not driver.find_elements(By.ID, "chart-load")
    finally:
        driver.quit()
