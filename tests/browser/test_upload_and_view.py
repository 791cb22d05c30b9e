"""End to end in a real browser: log in, upload a real CT, open its study, see it rendered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.urls import reverse

from studies.models import Study

expect = pytest.importorskip("playwright.sync_api").expect


@pytest.mark.browser
def test_upload_a_ct_and_view_it(transactional_db, live_server, user, browser_page, dicom_files: Path):
    page = browser_page
    ct = dicom_files / "pydicom-test_files" / "CT_small.dcm"

    # Every page needs a login: the upload page sends us through the form and back.
    page.goto(live_server.url + reverse("studies:upload"))
    expect(page).to_have_url(re.compile(r"/login/\?next=/upload/$"))
    page.fill("#id_username", user.username)
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    expect(page).to_have_url(live_server.url + reverse("studies:upload"))
    # The URL changes when the navigation commits; upload.js (deferred) listens for the
    # chosen files only once the document is parsed. On a busy machine the gap is real.
    page.wait_for_load_state("domcontentloaded")

    page.set_input_files("input[data-files]", str(ct))
    row = page.locator(".upload-results li").first
    expect(row.locator(".outcome")).to_have_text("stored")
    expect(row.locator(".name")).to_have_text("CT_small.dcm")
    expect(page.locator("[data-summary]")).to_contain_text("1 stored")
    expect(page.locator("[data-progress-text]")).to_contain_text("1 of 1 files")

    row.get_by_role("link", name="Open study").click()
    study = Study.objects.get()
    expect(page).to_have_url(live_server.url + study.get_absolute_url())

    # viewer.js fetched the render and decoded it into the <img>.
    page.wait_for_function("() => document.querySelector('[data-image]').naturalWidth > 0")
    assert page.eval_on_selector("[data-image]", "img => [img.naturalWidth, img.naturalHeight]") == [128, 128]
    expect(page.locator("[data-wl-readout]")).to_have_text(re.compile(r"^C -?[\d.]+ W [\d.]+$"))
    expect(page.locator("[data-message]")).to_be_hidden()
    # No model has drawn anything: the overlay toggles stay out of the way (the toolbar's
    # display rule once overrode their `hidden` attribute).
    expect(page.locator("[data-detections-label]")).to_be_hidden()
    expect(page.locator("[data-masks-label]")).to_be_hidden()

    # A preset renders again on the server; the readout follows the headers it returns.
    page.select_option("[data-preset]", "lung")
    expect(page.locator("[data-wl-readout]")).to_have_text("C -600 W 1500")
