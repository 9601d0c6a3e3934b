"""`imgindex serve`'s web page in headless Chromium, against a real server.

Screenshots go to test-artifacts/ (serve-*.png): look at them.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
from PIL import Image

from imgindex.pipeline.synthetic import write_photos
from tests.conftest import ARTIFACTS, crop_query
from tests.helpers import invoke

try:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # the browser fixture skips (or fails, in CI) without it
    By = Select = WebDriverWait = StaleElementReferenceException = None

pytestmark = pytest.mark.slow


def _open(browser, service) -> None:
    """The page, entered as a user does: through the URL `imgindex serve`
    printed, which trades the token for the cookie and lands on /."""
    browser.get_log("browser")  # forget what an earlier test left there
    browser.get(service.login_url)
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("return document.readyState") == "complete"
    )
    assert browser.current_url == service.url + "/"  # the token left the address


def _wait_for_option(browser, select: str, value: str, seconds: float) -> None:
    """Wait until the page's <select id=select> offers ``value`` (the list is
    redrawn as indexes change: a stale option is looked at again)."""
    WebDriverWait(
        browser, seconds, ignored_exceptions=(StaleElementReferenceException,)
    ).until(
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
    _open(browser, beach)
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

    # A phone's HEIC, which the browser cannot show: its name stands for it.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    heic = tmp_path / "IMG_0007.heic"
    with Image.open(source) as photo:
        photo.save(heic, "HEIF", quality=90)
    browser.find_element(By.ID, "query-file").send_keys(str(heic))
    WebDriverWait(browser, 60).until(
        lambda b: (
            b.find_element(By.ID, "error").get_attribute("hidden")
            and b.find_element(By.ID, "query-label").text == "IMG_0007.heic"
            and "12 hits in" in b.find_element(By.ID, "search-status").text
        )
    )
    assert not browser.find_element(By.ID, "query-preview").is_displayed()
    first = browser.find_element(By.CSS_SELECTOR, "#results li.hit")
    assert first.get_attribute("data-path") == source.name
    _shot(browser, "search-heic")


def test_start_a_build_and_watch_it_reach_100_percent(service, browser):
    write_photos(service.dataset_root / "garden", 60, seed=51, max_side=320)
    _open(browser, service)
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=builds]").click()
    box = WebDriverWait(browser, 20).until(
        lambda b: b.find_element(
            By.CSS_SELECTOR, "#build-datasets input[data-name=garden]"
        )
    )
    box.click()
    browser.execute_script(
        """window.seenPercents = [];
        setInterval(() => {
          const bar = document.querySelector(".bar[data-dataset=garden]");
          const seen = window.seenPercents;
          const value = bar && Number(bar.getAttribute("aria-valuenow"));
          if (bar && seen[seen.length - 1] !== value) seen.push(value);
        }, 10);"""
    )
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

    # Every value the bar shows is recorded by the page itself, however fast
    # the build: a window that a poll from here must catch would be missed by
    # a fast machine.
    WebDriverWait(browser, 60, poll_frequency=0.05).until(
        lambda b: shown(b)["percent"] >= 0
    )
    _shot(browser, "build-running")
    WebDriverWait(browser, 180).until(lambda b: shown(b)["state"] == "finished")
    done = shown(browser)
    assert done["percent"] == 100
    seen = browser.execute_script("return window.seenPercents")
    # Drawn before it ended (the answer to the start comes at once), and the
    # bar only ever grew.
    assert seen[0] < 100 and seen[-1] == 100, seen
    assert seen == sorted(seen), seen
    assert done["line"].startswith("garden: done, 60 of 60 images"), done
    # Read in the page: the status poll redraws the link, so a handle from
    # here can go stale between finding it and reading it.
    href = browser.execute_script(
        "const a = document.getElementById('dashboard-link');return a ? a.href : null;"
    )
    assert href and href.startswith("http://127.0.0.1:"), href
    assert not _severe(browser)
    _shot(browser, "build-done")
    # The new index is offered for searching.
    _wait_for_option(browser, "index-select", "garden", 20)


def test_browse_the_duplicate_groups(service, album, browser):
    report = service.request("GET", "/api/indexes/album/duplicates").json()
    _open(browser, service)
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
    assert summary.endswith("No other shots of one scene.")
    assert not _severe(browser)
    _shot(browser, "duplicates")


def test_the_duplicates_tab_shows_other_shots_apart_from_copies(
    service, scenes, browser
):
    _open(browser, service)
    _wait_for_option(browser, "dup-index", "scenes", 20)
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=duplicates]").click()
    Select(browser.find_element(By.ID, "dup-index")).select_by_value("scenes")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#dup-groups .group.shots")
    )
    (copies,) = browser.find_elements(By.CSS_SELECTOR, "#dup-groups .group:not(.shots)")
    assert "keep: " in copies.find_element(By.CSS_SELECTOR, ".member.keeper").text
    (edit,) = copies.find_elements(By.CSS_SELECTOR, ".member.edited")
    assert edit.text.startswith("rocket-stickered.jpg")
    assert "differs from the keeper in a region: kept" in edit.text
    (shots,) = browser.find_elements(By.CSS_SELECTOR, "#dup-groups .group.shots")
    best = shots.find_element(By.CSS_SELECTOR, ".member.best").text
    assert best.startswith("best: stereo-") and "sharpness" in best
    assert len(shots.find_elements(By.CSS_SELECTOR, ".member")) == 2
    assert not shots.find_elements(By.CSS_SELECTOR, ".member.keeper")
    heading = browser.find_element(By.CSS_SELECTOR, "#dup-groups h2").text
    assert heading.startswith("Other shots of one scene (best first: sharpest")
    summary = browser.find_element(By.ID, "dup-summary").text
    assert "1 group of other shots of one scene: nothing to remove" in summary
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return [...document.querySelectorAll('#dup-groups img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    assert not _severe(browser)
    _shot(browser, "duplicates-shots")


def test_the_copies_box_labels_each_hit_a_copy_another_shot_or_not(
    service, scenes, browser, tmp_path
):
    folder = service.dataset_root / "scenes"
    query = tmp_path / "rocket-crop.jpg"
    with Image.open(folder / "rocket.jpg") as im:
        im.crop((40, 20, 400, 300)).rotate(90, expand=True).save(query, quality=80)
    _open(browser, service)
    _wait_for_option(browser, "index-select", "scenes", 20)
    Select(browser.find_element(By.ID, "index-select")).select_by_value("scenes")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("6")
    browser.find_element(By.ID, "copies").click()

    def told(expected_status: str) -> list[tuple[str, str, str]]:
        WebDriverWait(browser, 60).until(
            lambda b: expected_status in b.find_element(By.ID, "search-status").text
        )
        return [
            (
                li.get_attribute("data-path"),
                li.get_attribute("data-kind"),
                li.find_element(By.CSS_SELECTOR, ".kind").text,
            )
            for li in browser.find_elements(By.CSS_SELECTOR, "#results li.hit")
        ]

    browser.find_element(By.ID, "query-file").send_keys(str(query))
    hits = told("3 copies of the query, 0 other shots of its scene")
    assert sorted(hits[:3]) == [
        ("rocket-small.jpg", "copy", "a copy"),
        ("rocket-stickered.jpg", "copy", "a copy"),
        ("rocket.jpg", "copy", "a copy"),
    ]
    assert {kind for _, kind, _ in hits[3:]} == {"neither"} and len(hits) == 6
    assert not browser.find_elements(By.CSS_SELECTOR, "#results li.cut")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li.faint")) == 3
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    _shot(browser, "search-copies")

    # The stereo pair's left view: itself, and the other camera's view.
    browser.find_element(By.ID, "query-file").send_keys(str(folder / "stereo-left.jpg"))
    hits = told("1 copy of the query, 1 other shot of its scene")
    assert hits[:2] == [
        ("stereo-left.jpg", "identical", "the same file"),
        ("stereo-right.jpg", "shot", "another shot of the scene"),
    ]
    assert not _severe(browser)
    _shot(browser, "search-shots")


def _hits_shown(browser) -> list[dict]:
    return browser.execute_script(
        """return [...document.querySelectorAll('#results > li')].map(li => ({
             cut: li.classList.contains('cut'),
             faint: li.classList.contains('faint'),
             id: li.dataset.id, path: li.dataset.path,
             score: li.querySelector('.score') ?
               Number(li.querySelector('.score').textContent) : null}))"""
    )


def test_other_images_are_faded_and_any_hit_finds_more_like_it(
    service, album, browser, tmp_path
):
    """A crop of one photo of the album: its copies score as the same image,
    the other photo's copies fall below the duplicates threshold, faded after
    a line that says so; "More like this" on one of those searches by id."""
    from skimage import data

    query = tmp_path / "cat.jpg"
    Image.fromarray(data.chelsea()[40:260, 60:400]).save(query, quality=80)
    _open(browser, service)
    _wait_for_option(browser, "index-select", "album", 20)
    Select(browser.find_element(By.ID, "index-select")).select_by_value("album")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(len(album)))
    browser.find_element(By.ID, "query-file").send_keys(str(query))
    WebDriverWait(browser, 60).until(
        lambda b: len([h for h in _hits_shown(b) if not h["cut"]]) == len(album)
    )
    shown = _hits_shown(browser)
    cut = [i for i, h in enumerate(shown) if h["cut"]]
    assert len(cut) == 1, shown  # one line where "the same image" stops
    above, below = shown[: cut[0]], shown[cut[0] + 1 :]
    assert above and below
    assert all(h["score"] >= 0.5 and not h["faint"] for h in above)
    assert all(h["score"] < 0.5 and h["faint"] for h in below)
    assert {album[h["path"]] for h in above} == {"chelsea"}
    assert {album[h["path"]] for h in below} == {"coffee"}
    status = browser.find_element(By.ID, "search-status").text
    assert f"{len(above)} at 0.50 or more" in status, status
    _shot(browser, "search-faded")

    # More like one of the faded ones: a search by its id, itself first.
    other = below[0]
    target = f"#results li[data-id='{other['id']}'] button.like"
    browser.find_element(By.CSS_SELECTOR, target).click()
    WebDriverWait(browser, 60).until(
        lambda b: _hits_shown(b) and _hits_shown(b)[0]["id"] == other["id"]
    )
    first = _hits_shown(browser)[0]
    assert first["score"] > 0.999
    label = browser.find_element(By.ID, "query-label")
    assert label.is_displayed() and label.text == f"more like {other['path']}"
    assert not _severe(browser)
    _shot(browser, "search-more-like-this")

    # A hit opens larger, with its path, size, format and date.
    browser.find_element(By.CSS_SELECTOR, "#results li.hit button.thumb").click()
    WebDriverWait(browser, 20).until(
        lambda b: "pixels" in b.find_element(By.ID, "preview-facts").text
    )
    facts = browser.find_element(By.ID, "preview-facts").text
    source = service.dataset_root / "album" / first["path"]
    with Image.open(source) as im:
        assert f"{im.width} × {im.height} pixels" in facts
    assert str(source) in facts and "JPEG" in facts and " ago" in facts
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script(
            "const i = document.getElementById('preview-image');"
            "return i.complete && i.naturalWidth > 0"
        )
    )
    _shot(browser, "search-preview")
    browser.find_element(By.ID, "preview-close").click()
    info = browser.find_element(By.ID, "index-info").text
    assert re.fullmatch(
        rf"{len(album)} images · exact search · updated (just now|\d+ \w+ ago)", info
    ), info


def test_a_build_says_which_files_failed_and_a_rerun_that_nothing_changed(
    service, browser
):
    folder = service.dataset_root / "attic"
    write_photos(folder, 5, seed=91, max_side=320)
    (folder / "notes.jpg").write_text("a shopping list, not a photo\n")
    _open(browser, service)
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=builds]").click()

    def start() -> None:
        box = WebDriverWait(browser, 20).until(
            lambda b: b.find_element(
                By.CSS_SELECTOR, "#build-datasets input[data-name=attic]"
            )
        )
        if not box.is_selected():
            box.click()
        browser.find_element(By.ID, "build-start").click()

    def outcome(b) -> str:
        return b.execute_script(
            """const o = document.querySelector('.build .outcome[data-dataset=attic]');
               return o ? o.textContent : ''"""
        )

    start()
    WebDriverWait(browser, 180).until(lambda b: "indexed" in outcome(b))
    summary = browser.find_element(By.CSS_SELECTOR, ".build details.failed summary")
    assert summary.text == "1 file was not indexed: which and why"
    summary.click()
    failure = browser.find_element(By.CSS_SELECTOR, ".build .failures li").text
    assert failure.startswith("notes.jpg") and "not an image" in failure, failure
    _shot(browser, "build-failed-files")

    start()  # the same folder again: nothing added, changed or removed
    WebDriverWait(browser, 180).until(lambda b: "nothing changed" in outcome(b))
    assert "index was kept as it was (5 images)" in outcome(browser)
    _shot(browser, "build-nothing-changed")

    # Idle: the builds list is not fetched again and again.
    def fetched(b) -> int:
        return b.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.name.endsWith('/api/builds')).length"
        )

    before = fetched(browser)
    time.sleep(3)
    assert fetched(browser) == before
    assert not _severe(browser)


def test_a_moved_dataset_is_refused_then_kept_with_the_moved_box_ticked(
    service, browser, tmp_path
):
    before = tmp_path / "porch"
    write_photos(before, 4, seed=93, max_side=320)
    assert invoke("build", before, "--out", service.index_root).exit_code == 0
    shutil.move(before, service.dataset_root / "porch")  # a rename: times kept
    _open(browser, service)

    def info() -> str:
        Select(browser.find_element(By.ID, "index-select")).select_by_value("porch")
        return browser.find_element(By.ID, "index-info").text

    _wait_for_option(browser, "index-select", "porch", 20)
    assert f"its images are not at {before} (moved?" in info()
    _shot(browser, "index-not-found")
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=builds]").click()

    def start(moved: bool) -> None:
        box = WebDriverWait(browser, 20).until(
            lambda b: b.find_element(
                By.CSS_SELECTOR, "#build-datasets input[data-name=porch]"
            )
        )
        if not box.is_selected():
            box.click()
        moved_box = browser.find_element(By.ID, "build-moved")
        if moved_box.is_selected() != moved:
            moved_box.click()
        browser.find_element(By.ID, "build-start").click()

    def shown(b) -> str:
        return b.execute_script(
            """const bar = document.querySelector('.bar[data-dataset=porch]');
               const o = document.querySelector('.build .outcome[data-dataset=porch]');
               return (bar ? bar.parentElement.textContent : '') + '|'
                 + (o ? o.textContent : '')"""
        )

    start(moved=False)
    # A dataset that fails is drawn with its error (the page once stopped
    # at "starting", failing to draw the failed dataset's summary).
    WebDriverWait(browser, 60).until(lambda b: "porch: not built: " in shown(b))
    assert "holds another dataset" in shown(browser) and "--moved" in shown(browser)
    _shot(browser, "build-moved-refused")
    start(moved=True)
    WebDriverWait(browser, 60).until(lambda b: "Moved here from" in shown(b))
    assert f"Moved here from {before}" in shown(browser)
    assert "nothing changed; the index was kept as it was (4 images)" in shown(browser)
    _shot(browser, "build-moved-kept")
    for photo in (service.dataset_root / "porch").iterdir():
        os.utime(photo)  # now, as a copy that dropped the times would have them
    start(moved=False)
    WebDriverWait(browser, 60).until(lambda b: "new modification time" in shown(b))
    assert "4 images indexed, 0 embedded now." in shown(browser)
    assert "4 unchanged images had a new modification time (same bytes" in shown(
        browser
    )
    _shot(browser, "build-touched")
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=search]").click()
    WebDriverWait(browser, 20).until(lambda b: "not at" not in info())
    assert info().startswith("4 images · exact search")
    assert not _severe(browser)


def test_the_duplicates_tab_lists_outliers_flagged_and_broken_images(service, browser):
    from tests.helpers import invoke

    folder = service.dataset_root / "cellar"
    photos = write_photos(folder, 6, seed=93, max_side=320)
    with Image.open(photos[0]) as im:
        im.point(lambda v: v // 8).save(folder / "underexposed.jpg")
        im.resize((48, 32)).save(folder / "icon.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    assert service.wait(service.build("cellar")["id"])["state"] == "finished"
    run = invoke("duplicates", service.index_root / "cellar", "--save")
    assert run.exit_code == 0, run.stderr
    _open(browser, service)
    browser.find_element(By.CSS_SELECTOR, "button.tab[data-tab=duplicates]").click()
    _wait_for_option(browser, "dup-index", "cellar", 20)
    Select(browser.find_element(By.ID, "dup-index")).select_by_value("cellar")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#dup-broken li")
    )
    dark = browser.find_element(By.CSS_SELECTOR, ".flagged[data-flag=dark]").text
    assert "dark: 1 image" in dark and "underexposed.jpg" in dark
    tiny = browser.find_element(By.CSS_SELECTOR, ".flagged[data-flag=tiny]").text
    assert "tiny: 1 image" in tiny and "icon.jpg" in tiny
    broken = browser.find_element(By.ID, "dup-broken").text
    assert "broken.jpg" in broken and "Not indexed: 1 file" in broken
    assert browser.find_elements(By.CSS_SELECTOR, "#dup-outliers .member img")
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return [...document.querySelectorAll('#dup-more img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    assert not _severe(browser)
    browser.execute_script("document.getElementById('dup-more').scrollIntoView()")
    _shot(browser, "duplicates-flagged")


def test_file_names_with_markup_are_shown_as_text(service, browser):
    name = "<img src=x onerror=window.pwned=1>.jpg"
    folder = service.dataset_root / "names"
    (photo,) = write_photos(folder, 1, seed=95, max_side=320)
    photo.rename(folder / name)
    write_photos(folder, 2, seed=96, max_side=320)
    assert service.wait(service.build("names")["id"])["state"] == "finished"
    _open(browser, service)
    _wait_for_option(browser, "index-select", "names", 20)
    Select(browser.find_element(By.ID, "index-select")).select_by_value("names")
    browser.find_element(By.ID, "query-file").send_keys(str(folder / name))
    WebDriverWait(browser, 60).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results li.hit")) == 3
    )
    first = browser.find_element(By.CSS_SELECTOR, "#results li.hit .path")
    assert first.text == name
    assert browser.execute_script("return window.pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img[src=x]")
    _shot(browser, "search-markup-name")
