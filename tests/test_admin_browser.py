"""The EmbeddingVersion admin in a real headless Chromium (issue 5, acceptance 1).

Debian's ``chromium`` and ``chromium-driver`` are installed by the test set-up (Makefile); these
tests fail, never skip, when they are missing. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from embeddings_app import backfill, lifecycle
from embeddings_app.models import EmbeddingVersion, State
from tests.conftest import TARGET
from tests.workers import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "pw-for-browser-tests"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--window-size=1900,1100")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                    "(`make venv` does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # The system chromedriver, given explicitly: Selenium never looks for or downloads a driver.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    # The whole page, not only the window: the list and the detail page are taller than that.
    driver.set_window_size(1900, 1100)
    height = driver.execute_script("return document.getElementById('container').scrollHeight")
    driver.set_window_size(1900, max(1100, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(ARTIFACTS / f"admin-{name}.png"))


def log_in(driver: webdriver.Chrome, base: str, username: str) -> None:
    driver.get(f"{base}/admin/login/?next=/admin/")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(driver, 20).until(EC.presence_of_element_located((By.ID, "user-tools")))
    # Fold the admin's navigation sidebar (its own remembered setting) to give the list room.
    driver.execute_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")


def bar(driver: webdriver.Chrome, version: EmbeddingVersion) -> tuple[float, str, str]:
    """(bar width in %, coverage text, state badge text) of ``version`` as the page shows them."""
    width, label, state = driver.execute_script(
        "const id = arguments[0];"
        "const q = f => document.querySelector(`[data-ev-id='${id}'][data-ev-field='${f}']`);"
        "return [q('bar').style.width, q('coverage_label').textContent, q('state').textContent];",
        str(version.pk))
    return float(width.rstrip("%")), label, state


def test_watch_a_running_backfill_then_activate_through_the_confirmation_page(
        live_server, browser, make_articles, celery_worker):
    make_articles(200)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    v1, v2 = (EmbeddingVersion.objects.get(target=TARGET, version=name) for name in ("v1", "v2"))
    run, ranges = backfill.start(v1, batch_size=50, mode="inline")
    backfill.run_inline(run, ranges)
    v1.refresh_from_db()
    lifecycle.transition(v1, State.ACTIVE, actor="test")  # the starting point: v1 serves reads
    user = User.objects.create_user("operator", password=PASSWORD, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="embeddings_app",
        codename__in=("view_embeddingversion", "run_backfill", "switch_active", "drop_version")))

    # A real backfill of v2: 20 batches of 10 rows run by the backfill's own code in a thread,
    # paced (0.4 s after each batch) so that the page can be seen following it.
    run, ranges = backfill.start(v2, batch_size=10, mode="inline", actor="test")
    assert len(ranges) == 20
    errors: list[BaseException] = []

    def work() -> None:
        try:
            backfill.run_inline(run, ranges, progress=lambda _rows: time.sleep(0.4))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    log_in(browser, live_server.url, "operator")
    browser.get(f"{live_server.url}/admin/embeddings_app/embeddingversion/")
    assert bar(browser, v2)[2] == "backfilling"
    browser.execute_script("window.__notReloaded = 'same page';")
    worker = threading.Thread(target=work, daemon=True)
    worker.start()

    seen: list[float] = []
    mid_screenshot = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        width, _label, state = bar(browser, v2)
        if not seen or width != seen[-1]:
            seen.append(width)
        if 20 < width < 80 and not mid_screenshot:
            screenshot(browser, "list-backfilling")
            mid_screenshot = True
        if state == "ready":
            break
        time.sleep(0.25)
    worker.join(timeout=60)
    assert not errors, errors
    assert bar(browser, v2)[2] == "ready"
    assert browser.execute_script("return window.__notReloaded") == "same page"  # no reload
    polls = int(browser.find_element(By.ID, "ev-status").get_attribute("data-polls"))
    print(f"bar widths seen without reload: {seen}; {polls} polls")
    assert seen[0] < 100 and seen[-1] == 100.0
    assert len([w for w in seen if 0 < w < 100]) >= 3, seen  # it advanced step by step
    assert seen == sorted(seen), seen
    assert mid_screenshot
    screenshot(browser, "list-ready")
    assert "200 / 200 (100.0%)" in bar(browser, v2)[1]

    # The detail page: the chart of the finished run, then index, verify and activate.
    browser.get(f"{live_server.url}/admin/embeddings_app/embeddingversion/{v2.pk}/change/")
    points = int(browser.find_element(By.CSS_SELECTOR, "#ev-chart svg").get_attribute("data-points"))
    assert points >= 5, points  # samples about a second apart over a run of 8+ seconds
    screenshot(browser, "detail-ready")
    # "Build index" runs on a real Celery worker; the page follows it without a reload.
    worker = celery_worker(concurrency=1)
    click_to_next_page(browser, "ev-step-index", timeout=60)
    WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".messagelist")))
    assert "sent to queue" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    browser.execute_script("window.__notReloaded = 'index page';")
    index_cell = f"[data-ev-id='{v2.pk}'][data-ev-field='index']"
    WebDriverWait(browser, 120).until(lambda driver: driver.find_element(
        By.CSS_SELECTOR, index_cell).text == "valid", message=worker.log()[-3000:])
    assert browser.execute_script("return window.__notReloaded") == "index page"
    assert "embeddings_app.build_index" in worker.log()
    assert v2.events.filter(note__contains="built and valid").exists()
    click_to_next_page(browser, "ev-step-verify", timeout=60)
    WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".messagelist")))
    assert "PASSED" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text

    click_to_next_page(browser, "ev-step-activate", timeout=20)
    WebDriverWait(browser, 20).until(EC.presence_of_element_located((By.ID, "ev-consequences")))
    consequences = browser.find_element(By.ID, "ev-consequences").text
    assert f"Reads of {TARGET} switch to {TARGET}@v2" in consequences
    assert f"{TARGET}@v1" in consequences and "becomes standby" in consequences
    assert "activation checks pass now" in consequences
    screenshot(browser, "confirm-activate")
    v2.refresh_from_db()
    assert v2.state == State.READY  # the confirmation page itself changed nothing
    click_to_next_page(browser, "ev-confirm", timeout=30)
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".messagelist")))
    # textContent: the admin's stylesheet capitalizes the first letter of what .text returns.
    assert f"{TARGET}: reads now use version v2." in browser.find_element(
        By.CSS_SELECTOR, ".messagelist").get_attribute("textContent")
    screenshot(browser, "detail-activated")

    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v1.state, v2.state) == (State.STANDBY, State.ACTIVE)
    event = v2.events.order_by("at", "id").last()
    assert (event.from_state, event.to_state, event.actor) == ("ready", "active", "admin:operator")


def click_to_next_page(driver: webdriver.Chrome, element_id: str, timeout: float) -> None:
    """Click a step's button and wait until the browser has left the page: the page before may
    show a message list too (the previous step's), which must not be read as this step's."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, timeout).until(EC.staleness_of(page))
