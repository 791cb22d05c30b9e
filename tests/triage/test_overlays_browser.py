"""In a real browser: the viewer draws the detector's boxes and the segmenter's masks
from the overlays API, aligned with the image under zoom, and toggles them."""

from __future__ import annotations

import re

import pytest

from triage.models import Detection

from .test_localise import register_tiny_models

expect = pytest.importorskip("playwright.sync_api").expect


def _rect(page, selector: str) -> dict:
    return page.eval_on_selector(
        selector, "el => { const r = el.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; }"
    )


@pytest.mark.browser
def test_viewer_draws_detections_and_masks_aligned_with_the_image(
    transactional_db, live_server, user, browser_page, mammogram, ingest
):
    register_tiny_models()
    instance = ingest(mammogram())
    best = Detection.objects.filter(instance=instance).order_by("-score").first()
    assert best is not None
    page = browser_page
    page.goto(live_server.url + "/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    page.goto(live_server.url + instance.series.study.get_absolute_url())

    page.wait_for_function("() => document.querySelector('[data-image]').naturalWidth > 0")
    page.wait_for_function("() => document.querySelectorAll('[data-detections] rect').length > 0")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-masks] img')].filter(i => i.naturalWidth === 1024).length === 2"
    )
    expect(page.locator("[data-detections-text]")).to_have_text(re.compile(r"^Detections \(\d\)$"))
    expect(page.locator("[data-masks-text]")).to_have_text("Masks (breast, lesion)")

    def check_alignment() -> None:
        image = _rect(page, "[data-image]")
        for selector in ("[data-detections]", "[data-masks] img"):
            layer = _rect(page, selector)
            for key in ("x", "y", "w", "h"):
                assert layer[key] == pytest.approx(image[key], abs=1.0), (selector, key)
        # The best box sits where its image pixels are on screen.
        box = _rect(page, "[data-detections] g:first-of-type rect")
        per_pixel = image["w"] / 1024
        assert box["x"] == pytest.approx(image["x"] + best.x0 * per_pixel, abs=2.5)
        assert box["y"] == pytest.approx(image["y"] + best.y0 * per_pixel, abs=2.5)

    check_alignment()
    width = _rect(page, "[data-image]")["w"]
    page.click('[data-action="zoom-in"]')
    assert _rect(page, "[data-image]")["w"] == pytest.approx(width * 1.25, rel=0.01)
    check_alignment()

    page.uncheck("[data-detections-toggle]")
    expect(page.locator("[data-detections]")).to_be_hidden()
    page.uncheck("[data-masks-toggle]")
    expect(page.locator("[data-masks]")).to_be_hidden()
    page.check("[data-detections-toggle]")
    expect(page.locator("[data-detections] rect").first).to_be_visible()
