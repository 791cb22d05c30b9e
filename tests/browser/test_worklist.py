"""In a real browser: new studies reach the worklist without moving rows under a reader.

While the radiologist is at the top of the list and idle, arrivals come in by
themselves; while they use the list, the polling bar waits for "Show". Either way the
new rows are marked.
"""

from __future__ import annotations

import io
import re

import pytest
from django.urls import reverse
from pydicom.uid import generate_uid

from studies import services

expect = pytest.importorskip("playwright.sync_api").expect


@pytest.mark.browser
def test_arrivals_come_in_live_without_moving_rows_under_a_reader(
    transactional_db, live_server, user, browser_page, make_dicom, monkeypatch
):
    from triage import views

    monkeypatch.setattr(views, "POLL_SECONDS", 1)

    def arrive(name: str) -> str:
        uid = generate_uid()
        data = make_dicom(StudyInstanceUID=uid, SeriesInstanceUID=generate_uid(), PatientName=name)
        assert services.instance_ingest(source=io.BytesIO(data)).ok
        return name.replace("^", ", ")

    arrive("First^Study")
    page = browser_page
    page.goto(live_server.url + reverse("triage:worklist"))
    page.fill("#id_username", user.username)
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/worklist/$"))
    rows = page.locator("#worklist-results tr.worklist-row")
    expect(rows).to_have_count(1)

    # At the top and idle (worklist.js waits 5 s after the last input): it comes in alone.
    second = arrive("Second^Study")
    expect(rows).to_have_count(2, timeout=30_000)
    expect(page.locator("tr.worklist-row.arrived")).to_contain_text(second)
    expect(page.locator("tr.worklist-row:not(.arrived)")).to_contain_text("First, Study")

    # A reader using the list (a filter has the focus): the bar announces, the rows stay.
    page.locator("#id_modality").focus()
    third = arrive("Third^Study")
    show = page.locator("#worklist-changes [data-keep-place]")
    expect(show).to_be_visible(timeout=30_000)
    expect(page.locator("#worklist-changes")).to_contain_text("1 new study")
    page.wait_for_timeout(7_000)  # idle long enough, but still focused on the filters
    expect(rows).to_have_count(2)
    show.click()
    expect(rows).to_have_count(3)
    expect(page.locator("tr.worklist-row.arrived")).to_have_count(1)
    expect(page.locator("tr.worklist-row.arrived")).to_contain_text(third)
