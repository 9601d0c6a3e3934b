"""`imgindex serve`'s web page in headless Chromium, against a real server.

Screenshots go to test-artifacts/ (serve-*.png): look at them.
"""

from __future__ import annotations

import pytest

from pipeline.synthetic import write_photos
from tests.conftest import ARTIFACTS, crop_query

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # the browser fixture skips (or fails, in CI) without it
    By = Select = WebDriverWait = None

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def beach(service):
    """The 'beach' index, built through the API unless another module did."""
    names = {
        i["name"] for i in service.request("GET", "/api/indexes").json()["indexes"]
    }
    if "beach" not in names:
        assert service.wait(service.build("beach")["id"])["state"] == "finished"
    return service


def _open(browser, url: str) -> None:
    browser.get_log("browser")  # forget what an earlier test left there
    browser.get(url)
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("return document.readyState") == "complete"
    )


def _wait_for_option(browser, select: str, value: str, seconds: float) -> None:
    """Wait until the page's <select id=select> offers ``value``."""
    WebDriverWait(browser, seconds).until(
        lambda b: (
            value
            in [
                o.get_attribute("value")
                for o in Select(b.find_element(By.ID, select)).options
            ]
        )
    )


def _severe(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _shot(browser, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"serve-{name}.png"))


def test_upload_a_query_and_see_its_source_first(beach, browser, photo_sets, tmp_path):
    source = photo_sets["beach"][7]
    query = crop_query(source, tmp_path / "query.jpg")
    _open(browser, beach.url + "/")
    _wait_for_option(browser, "index-select", "beach", 20)
    Select(browser.find_element(By.ID, "index-select")).select_by_value("beach")
    browser.find_element(By.ID, "query-file").send_keys(str(query))
    WebDriverWait(browser, 60).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results li.hit")) == 12
    )
    # Every hit's thumbnail arrived and decoded.
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    first = browser.find_element(By.CSS_SELECTOR, "#results li.hit")
    assert first.get_attribute("data-rank") == "1"
    assert first.get_attribute("data-path") == source.name
    assert first.find_element(By.CSS_SELECTOR, ".path").text == source.name
    assert "12 hits in" in browser.find_element(By.ID, "search-status").text
    assert browser.find_element(By.ID, "error").get_attribute("hidden")
    assert not _severe(browser)
    _shot(browser, "search")

    # Not an image: the page says why, in one line.
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    browser.find_element(By.ID, "query-file").send_keys(str(notes))
    WebDriverWait(browser, 30).until(
        lambda b: not b.find_element(By.ID, "error").get_attribute("hidden")
    )
    error = browser.find_element(By.ID, "error").text
    assert "'notes.jpg' is not a usable image" in error
    _shot(browser, "search-error")


def test_start_a_build_and_watch_it_reach_100_percent(service, browser):
    write_photos(service.dataset_root / "garden", 60, seed=51, max_side=320)
    _open(browser, service.url + "/")
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=builds]").click()
    box = WebDriverWait(browser, 20).until(
        lambda b: b.find_element(
            By.CSS_SELECTOR, "#build-datasets input[data-name=garden]"
        )
    )
    box.click()
    token = browser.find_element(By.ID, "token")
    assert token.is_displayed()  # the service was started with a token
    token.clear()
    token.send_keys(service.token)
    browser.find_element(By.ID, "build-start").click()

    # The list is drawn anew as the build goes: read it in one script call,
    # not through element handles that a redraw would make stale.
    def shown(b) -> dict:
        return b.execute_script(
            """
            const bar = document.querySelector(".bar[data-dataset=garden]");
            const build = bar && bar.closest(".build");
            return bar ? {
              percent: Number(bar.getAttribute("aria-valuenow")),
              state: build.querySelector(".state").textContent,
              line: bar.parentElement.firstChild.textContent,
            } : {percent: -1};"""
        )

    WebDriverWait(browser, 60, poll_frequency=0.1).until(
        lambda b: 0 < shown(b)["percent"] < 100
    )
    _shot(browser, "build-running")
    WebDriverWait(browser, 180).until(lambda b: shown(b)["state"] == "finished")
    done = shown(browser)
    assert done["percent"] == 100
    assert done["line"].startswith("garden: done, 60 of 60 images"), done
    link = browser.find_element(By.ID, "dashboard-link")
    assert link.get_attribute("href").startswith("http://127.0.0.1:")
    assert not _severe(browser)
    _shot(browser, "build-done")
    # The new index is offered for searching.
    _wait_for_option(browser, "index-select", "garden", 20)


def test_browse_the_duplicate_groups(service, album, browser):
    report = service.request("GET", "/api/indexes/album/duplicates").json()
    _open(browser, service.url + "/")
    _wait_for_option(browser, "dup-index", "album", 20)
    Select(browser.find_element(By.ID, "dup-index")).select_by_value("album")
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=duplicates]").click()
    WebDriverWait(browser, 30).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#dup-groups .group")) == 2
    )
    groups = browser.find_elements(By.CSS_SELECTOR, "#dup-groups .group")
    for shown, group in zip(groups, report["page"], strict=True):
        keeper = shown.find_element(By.CSS_SELECTOR, ".member.keeper")
        assert f"keep: {group['keeper']}" in keeper.text
        members = shown.find_elements(By.CSS_SELECTOR, ".member")
        assert len(members) == len(group["members"]) == len(album) // 2
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return [...document.querySelectorAll('#dup-groups img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    summary = browser.find_element(By.ID, "dup-summary").text
    assert summary.startswith(f"{len(album)} of {len(album)} images in 2 groups")
    assert not _severe(browser)
    _shot(browser, "duplicates")
