"""The worklist in a real browser: new studies announced live without moving the list
under a reader, taken in by themselves while the reader is at the top and idle, read
marks swapping one row. Real files ingested; Chromium drives the htmx page."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse
from pydicom.uid import generate_uid

from studies.models import Finding

expect = pytest.importorskip("playwright.sync_api").expect


def open_worklist(page, live_server, user):
    """Log in through the form, which sends the reader on to the worklist."""
    page.goto(live_server.url + reverse("triage:worklist"))
    page.fill("#id_username", user.username)
    page.fill("#id_password", "a-long-test-password")
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/worklist/$"))
    return page


@pytest.mark.browser
def test_live_arrivals_keep_the_scroll_position(
    transactional_db, live_server, user, browser_page, ingest, mammogram, make_dicom, monkeypatch
):
    from triage import views

    monkeypatch.setattr(views, "POLL_SECONDS", 1)
    flagged = ingest(mammogram(patient_id="FLAGGED"))
    Finding.objects.create(instance=flagged, pathology="malignant", abnormality_class="SPIC", source="radiologist")
    for number in range(30):  # enough rows to scroll
        ingest(
            make_dicom(PatientID=f"CT-{number:02d}", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
        )

    page = open_worklist(browser_page, live_server, user)
    rows = page.locator("tr.worklist-row")
    expect(rows).to_have_count(31)
    expect(rows.first).to_contain_text("Urgent")

    page.evaluate("window.scrollTo(0, 600)")
    page.evaluate("window.__worklistMarker = 1")  # gone if the page reloads
    top_row = page.evaluate("document.elementFromPoint(400, 300).closest('tr').id")
    ingest(mammogram(patient_id="LATE"))
    bar = page.locator(".changes-bar")
    expect(bar).to_contain_text("1 new study", timeout=10_000)
    # The list under the cursor did not move or re-render.
    assert page.evaluate("window.scrollY") == 600
    assert page.evaluate("document.elementFromPoint(400, 300).closest('tr').id") == top_row
    expect(rows).to_have_count(31)

    # Marking a row read swaps only that row, with an undo.
    row = page.locator(f"#{top_row}")
    row.get_by_role("button", name="Mark read").click()
    expect(row.get_by_role("button", name="Mark unread")).to_be_visible()
    expect(row).to_have_class(re.compile(r"is-read"))
    assert page.evaluate("window.scrollY") == 600

    bar.get_by_role("link", name="Show").click()
    expect(rows).to_have_count(31)  # one read study left, one new arrived
    expect(page.locator("#worklist-results")).to_contain_text("LATE")
    expect(page.locator("tr.worklist-row.arrived")).to_have_count(1)  # marked as it came in
    expect(bar).to_have_count(0)
    assert page.evaluate("window.__worklistMarker") == 1


@pytest.mark.browser
def test_arrivals_come_in_live_without_moving_rows_under_a_reader(
    transactional_db, live_server, user, browser_page, ingest, make_dicom, monkeypatch
):
    from triage import views

    monkeypatch.setattr(views, "POLL_SECONDS", 1)

    def arrive(name: str) -> str:
        ingest(make_dicom(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientName=name))
        return name.replace("^", ", ")

    arrive("First^Study")
    page = open_worklist(browser_page, live_server, user)
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
