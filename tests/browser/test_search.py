"""End to end in a real browser: from a study's viewer to similar cases and a comparison.

Real MIAS films imported as DICOM, a real (tiny, untrained) encoder embedding them, a
real FAISS index behind the live server, and Chromium driving the htmx page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.urls import reverse

from embeddings import encoder as enc
from embeddings import services
from embeddings.models import SearchFeedback
from studies.datasets import mias
from studies.datasets.importer import import_conversion
from studies.models import Instance

expect = pytest.importorskip("playwright.sync_api").expect

IMAGES_LOADED = "els => els.length > 0 && els.every(img => img.complete && img.naturalWidth > 0)"


@pytest.fixture
def searchable(transactional_db, datasets: Path, tmp_path: Path):
    """12 MIAS films (6 patients) embedded by an active 64 px, 32-dim ResNet-18."""
    services.forget_indexes()
    import_conversion(mias.read(datasets / "mini-mias", limit=12), cohort="mias-small", progress=False)
    model = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "tiny.pt", model)
    services.encoder_activate(encoder=services.encoder_register(path=tmp_path / "tiny.pt", name="tiny"), wait=True)
    yield Instance.objects.filter(series__modality="MG").select_related("series__study").order_by("pk")
    services.forget_indexes()


@pytest.mark.browser
def test_find_similar_filter_and_compare(searchable, live_server, user, browser_page):
    page = browser_page
    query = next(i for i in searchable if i.findings.filter(x0__isnull=False).exists())
    study_url = query.series.study.get_absolute_url() + f"?instance={query.sop_instance_uid}"

    page.goto(live_server.url + study_url)
    page.fill("#id_username", user.username)
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(re.escape(query.series.study.get_absolute_url())))
    page.wait_for_function("() => document.querySelector('[data-image]').naturalWidth > 0")

    # The Box tool turns a drag on the image into a region query in image pixels.
    expect(page.locator("[data-find-lesions]")).to_have_attribute("aria-disabled", "true")
    page.click("button[data-tool=box]")
    layer = page.locator("[data-layer]").bounding_box()
    page.mouse.move(layer["x"] + layer["width"] * 0.25, layer["y"] + layer["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(layer["x"] + layer["width"] * 0.5, layer["y"] + layer["height"] * 0.5, steps=5)
    page.mouse.up()
    href = page.get_attribute("[data-find-lesions]", "href")
    box = [int(v) for v in re.search(r"box=([\d%C,]+)", href).group(1).replace("%2C", ",").split(",")]
    # A quarter to a half of the 1024² film, give or take the pixel under the pointer.
    assert all(abs(a - b) <= 3 for a, b in zip(box, [256, 256, 512, 512], strict=True)), box
    # The W/L tool still works after the Box tool.
    page.click("button[data-tool=wl]")
    expect(page.locator("button[data-tool=wl]")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("button[data-tool=box]")).to_have_attribute("aria-pressed", "false")

    # "Find similar" opens the search page with the image as the query.
    page.click("[data-find-similar]")
    expect(page).to_have_url(
        live_server.url
        + f"{reverse('search:search')}?sop_instance_uid={query.sop_instance_uid}&modality={query.series.modality}"
    )
    expect(page.locator("select[name=modality]")).to_have_value(query.series.modality)
    hits = page.locator("[data-hit]")
    expect(hits).to_have_count(10)  # k = 10: every image of the 5 other patients
    page.wait_for_function(f"() => ({IMAGES_LOADED})([...document.querySelectorAll('[data-hit] img')])")

    # A filter swaps only the grid (no reload: the marker survives) and pushes a shareable URL.
    page.evaluate("window.__searchPageMarker = 42")
    page.select_option("select[name=laterality]", "R")
    expect(page).to_have_url(re.compile(r"laterality=R"))
    expect(hits).to_have_count(5)
    expect(page.locator("[data-hit] .hit-series").first).to_contain_text("· R ·")
    assert all(" R " in text for text in page.locator("[data-hit] .hit-series").all_text_contents())
    assert page.evaluate("window.__searchPageMarker") == 42

    # A result opens the comparison: both images rendered, zoom linked.
    hits.first.locator(".hit-image").click()
    compare = page.locator("#compare-slot [data-compare]")
    expect(compare).to_be_visible()
    page.wait_for_function(f"() => ({IMAGES_LOADED})([...document.querySelectorAll('#compare-slot [data-image]')])")
    assert page.locator("#compare-slot [data-image]").count() == 2
    page.click("[data-compare-action=zoom-in]")
    expect(page.locator("#compare-slot [data-zoom-readout]")).to_have_text(["125%", "125%"])

    # A verdict from the comparison is stored, and shows on the result's card too.
    compare.get_by_role("button", name="Relevant", exact=True).click()
    expect(compare.locator(".feedback-note")).to_have_text("Saved")
    assert SearchFeedback.objects.filter(relevant=True, rank=1).count() == 1
    page.keyboard.press("Escape")
    expect(compare).to_have_count(0)
    expect(hits.first.locator("button.yes")).to_have_attribute("aria-pressed", "true")
    assert page.evaluate("window.__searchPageMarker") == 42
