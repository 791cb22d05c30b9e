"""Browser pages with the Django test client: real PostgreSQL, real DICOM files ingested.

Variants of real files (other patient, dates, UIDs) are made in memory with pydicom and
go through services.instance_ingest like any upload.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
from django.urls import reverse
from pydicom.uid import generate_uid

from studies import services
from studies.models import Instance, Study
from studies.services import Outcome

pytestmark = pytest.mark.django_db

HTMX_LIST = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "study-results"}
HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "viewer-slot"}


def ingest(path: Path, *, study_uid: str | None = None, **attributes: str) -> Instance:
    """Store a copy of a real file as a new instance (new UIDs), with header changes."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    buffer.seek(0)
    result = services.instance_ingest(source=buffer, name=path.name)
    assert result.outcome == Outcome.STORED, result.reason
    return result.instance


@pytest.fixture
def ct_path(dicom_files: Path) -> Path:
    return dicom_files / "pydicom-test_files" / "CT_small.dcm"


@pytest.fixture
def worklist(dicom_files: Path, ct_path: Path) -> dict[str, Study]:
    """Three studies with distinct patients, dates, accessions and modalities."""
    ct = ingest(ct_path, PatientName="Alpha^Ann", PatientID="PID-A", AccessionNumber="ACC-300", StudyDate="20200115")
    mr = ingest(
        dicom_files / "pydicom-test_files" / "MR_small.dcm",
        PatientName="Bravo^Ben",
        PatientID="PID-B",
        AccessionNumber="ACC-100",
        StudyDate="20210620",
    )
    second_mr = ingest(
        dicom_files / "pydicom-test_files" / "MR_small.dcm",
        study_uid=mr.series.study.study_instance_uid,
        PatientName="Bravo^Ben",
        PatientID="PID-B",
    )
    services.finding_upsert(
        instance=second_mr,
        source_key="test:1",
        pathology="malignant",
        abnormality_class="mass",
        x0=10,
        y0=12,
        x1=30,
        y1=40,
        source="dataset",
    )
    sr = ingest(
        dicom_files / "pydicom-test_files" / "reportsi.dcm",
        PatientName="Charlie^Cat",
        PatientID="PID-C",
        AccessionNumber="ACC-200",
        StudyDate="20220301",
    )
    return {name: instance.series.study for name, instance in [("ct", ct), ("mr", mr), ("sr", sr)]}


def listed(response) -> list[str]:
    return [study.accession_number for study in response.context["page"].object_list]


# --- login ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        reverse("studies:list"),
        reverse("studies:detail", args=["1.2.3"]),
        reverse("studies:viewer", args=["1.2.3", "1.2.3.4"]),
        reverse("studies:upload"),
    ],
)
def test_every_page_sends_anonymous_users_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


def test_login_page_renders_the_form(client):
    response = client.get(reverse("login"))
    assert response.status_code == 200
    assert b'name="username"' in response.content and b'name="password"' in response.content


def test_favicon_ico_points_at_the_icon_without_a_login(client):
    """Browsers ask for /favicon.ico on pages that name no icon: no 404 in the log."""
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith("img/favicon.svg")
    from django.contrib.staticfiles import finders

    assert finders.find("img/favicon.svg"), "the icon it points at is a static file"


# --- study list -------------------------------------------------------------------------


def test_list_shows_each_study_with_its_counts(browser_client, worklist):
    response = browser_client.get(reverse("studies:list"))
    assert response.status_code == 200
    assert listed(response) == ["ACC-200", "ACC-100", "ACC-300"]  # newest study first
    rows = {study.accession_number: study for study in response.context["page"].object_list}
    assert rows["ACC-100"].instance_count == 2 and rows["ACC-100"].lesion_count == 1
    assert rows["ACC-300"].instance_count == 1 and rows["ACC-300"].lesion_count == 0
    html = response.content.decode()
    assert "Alpha, Ann" in html and "PID-A" in html and "2020-01-15" in html
    assert worklist["mr"].get_absolute_url() in html
    assert "<html" in html and 'id="study-filters"' in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"q": "bravo"}, ["ACC-100"]),  # patient name, any case
        ({"q": "PID-C"}, ["ACC-200"]),  # patient ID
        ({"q": "ACC-3"}, ["ACC-300"]),  # accession
        ({"q": "nobody"}, []),
        ({"modality": "MR"}, ["ACC-100"]),
        ({"modality": "SR"}, ["ACC-200"]),
        ({"date_from": "2021-01-01"}, ["ACC-200", "ACC-100"]),
        ({"date_to": "2021-06-20"}, ["ACC-100", "ACC-300"]),
        ({"date_from": "2021-01-01", "date_to": "2021-12-31"}, ["ACC-100"]),
        ({"q": "PID", "modality": "CT"}, ["ACC-300"]),
    ],
)
def test_list_search_and_filters(browser_client, worklist, query, expected):
    response = browser_client.get(reverse("studies:list"), query)
    assert response.status_code == 200
    assert listed(response) == expected


def test_list_cohort_filter(browser_client, worklist):
    services.cohort_add_studies(name="screening", studies=[worklist["ct"], worklist["sr"]])
    response = browser_client.get(reverse("studies:list"), {"cohort": "screening"})
    assert listed(response) == ["ACC-200", "ACC-300"]
    assert b'<option value="screening" selected>' in response.content


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("date", ["ACC-200", "ACC-100", "ACC-300"]),
        ("-date", ["ACC-300", "ACC-100", "ACC-200"]),
        ("arrival", ["ACC-200", "ACC-100", "ACC-300"]),
        ("-arrival", ["ACC-300", "ACC-100", "ACC-200"]),
        ("patient", ["ACC-300", "ACC-100", "ACC-200"]),
        ("-patient", ["ACC-200", "ACC-100", "ACC-300"]),
        ("accession", ["ACC-100", "ACC-200", "ACC-300"]),
        ("-accession", ["ACC-300", "ACC-200", "ACC-100"]),
    ],
)
def test_list_sorts(browser_client, worklist, sort, expected):
    response = browser_client.get(reverse("studies:list"), {"sort": sort})
    assert listed(response) == expected


def test_sort_headers_toggle_and_keep_filters(browser_client, worklist):
    response = browser_client.get(reverse("studies:list"), {"q": "PID", "sort": "accession", "page": "1"})
    html = response.content.decode()
    header = re.search(r'<th[^>]*aria-sort="ascending"[^>]*><a href="([^"]+)"', html)
    assert header, "the active sort column says so"
    query = parse_qs(urlsplit(header.group(1).replace("&amp;", "&")).query)
    assert query == {"q": ["PID"], "sort": ["-accession"]}  # reversed, filters kept, back to page 1
    # The sort rides along with the filter form, so a new search keeps the order.
    assert '<input type="hidden" name="sort" value="accession" form="study-filters">' in html


def test_list_pagination(browser_client, ct_path):
    for number in range(27):
        ingest(ct_path, PatientName=f"Page^{number:02d}", AccessionNumber=f"P{number:02d}", StudyDate="20200101")
    first = browser_client.get(reverse("studies:list"), {"sort": "accession"})
    assert listed(first) == [f"P{n:02d}" for n in range(25)]
    assert b"1\xe2\x80\x9325 of 27 studies" in first.content
    assert b'rel="next"' in first.content and b'rel="prev"' not in first.content
    second = browser_client.get(reverse("studies:list"), {"sort": "accession", "page": "2"})
    assert listed(second) == ["P25", "P26"]
    assert b'rel="prev"' in second.content and b'rel="next"' not in second.content
    # Out-of-range and junk page numbers land on a real page instead of an error.
    assert listed(browser_client.get(reverse("studies:list"), {"sort": "accession", "page": "99"})) == ["P25", "P26"]
    assert listed(browser_client.get(reverse("studies:list"), {"sort": "accession", "page": "x"}))[0] == "P00"


def test_bad_filters_are_reported_and_ignored(browser_client, worklist):
    response = browser_client.get(
        reverse("studies:list"),
        {"date_from": "2020-13-45", "date_to": "yesterday", "sort": "sideways", "cohort": "missing", "modality": "XX"},
    )
    assert response.status_code == 200
    assert listed(response) == ["ACC-200", "ACC-100", "ACC-300"]  # nothing filtered, default sort
    html = response.content.decode()
    assert "Enter a valid date." in html and "(ignored)" in html
    assert "sideways is not one of the available choices" in html


def test_date_range_backwards_is_reported(browser_client, worklist):
    response = browser_client.get(reverse("studies:list"), {"date_from": "2022-01-01", "date_to": "2020-01-01"})
    assert response.status_code == 200
    assert "is before the From date" in response.content.decode()
    assert listed(response) == ["ACC-200"]  # the valid From date still applies


def test_htmx_request_gets_only_the_table_and_a_clean_url(browser_client, worklist):
    response = browser_client.get(
        reverse("studies:list"), {"q": "bravo", "modality": "", "date_from": "", "sort": "date"}, **HTMX_LIST
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and 'id="study-filters"' not in html
    assert "<table" in html and "Bravo, Ben" in html and "Alpha" not in html
    assert response["HX-Push-Url"] == f"{reverse('studies:list')}?q=bravo&sort=date"
    assert "HX-Request" in response["Vary"]


def test_htmx_history_restore_gets_the_full_page(browser_client, worklist):
    response = browser_client.get(
        reverse("studies:list"), {"q": "bravo"}, HTTP_HX_HISTORY_RESTORE_REQUEST="true", **HTMX_LIST
    )
    assert b"<html" in response.content and b'id="study-filters"' in response.content


def test_synthetic_patient_is_badged(browser_client, ct_path, worklist):
    synthetic = ingest(ct_path, PatientName="SYNTHETIC^Phantom", PatientID="SYN-1", AccessionNumber="ACC-SYN")
    study = synthetic.series.study
    assert study.patient.is_synthetic

    listing = browser_client.get(reverse("studies:list"), {"q": "SYN"}).content.decode()
    assert listing.count('class="badge synthetic"') == 1
    assert browser_client.get(reverse("studies:list"), {"q": "Alpha"}).content.count(b"badge synthetic") == 0

    page = browser_client.get(study.get_absolute_url()).content.decode()
    assert 'class="badge synthetic"' in page and "SYNTHETIC" in page
    real = browser_client.get(worklist["ct"].get_absolute_url()).content
    assert b"badge synthetic" not in real


# --- study page and viewer --------------------------------------------------------------


def test_study_page_lists_series_and_instances(browser_client, worklist):
    study = worklist["mr"]
    response = browser_client.get(study.get_absolute_url())
    assert response.status_code == 200
    html = response.content.decode()
    assert "Bravo, Ben" in html and "ACC-100" in html and "2021-06-20" in html
    instances = Instance.objects.filter(series__study=study)
    assert len(instances) == 2
    for instance in instances:
        assert reverse("api:instance-thumbnail", args=[instance.sop_instance_uid]) in html
        assert reverse("studies:viewer", args=[study.study_instance_uid, instance.sop_instance_uid]) in html
    assert html.count('class="series"') == 2
    # The first instance with pixels opens in the viewer.
    assert response.context["selected"].pk == instances.order_by("series__id").first().pk
    assert "data-viewer" in html and 'data-preview-url="/api/v1/instances/' in html


def test_study_page_lists_instances_without_pixels_by_sop_class(browser_client, worklist):
    response = browser_client.get(worklist["sr"].get_absolute_url())
    html = response.content.decode()
    assert response.status_code == 200
    assert "Basic Text SR Storage" in html and "has no pixel data" in html
    assert "thumbnail.png" not in html and "<img" not in html  # no broken images


def test_study_page_opens_the_instance_in_the_url(browser_client, worklist):
    study = worklist["mr"]
    last = Instance.objects.filter(series__study=study).order_by("-id").first()
    response = browser_client.get(study.get_absolute_url(), {"instance": last.sop_instance_uid})
    assert response.context["selected"].pk == last.pk
    assert response.content.decode().count('aria-current="true"') == 1


def test_unknown_study_is_404(browser_client):
    assert browser_client.get(reverse("studies:detail", args=["9.9.9"])).status_code == 404


def test_viewer_partial_for_a_ct(browser_client, worklist):
    study = worklist["ct"]
    instance = Instance.objects.get(series__study=study)
    url = reverse("studies:viewer", args=[study.study_instance_uid, instance.sop_instance_uid])
    response = browser_client.get(url, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and "data-viewer" in html
    assert f'data-preview-url="{reverse("api:instance-preview", args=[instance.sop_instance_uid])}"' in html
    assert 'data-rows="128" data-columns="128"' in html and 'data-size="2048"' in html
    presets = re.findall(r'<option value="(\w+)">', html)
    assert set(presets) == set("default auto full brain subdural stroke lung mediastinum abdomen liver bone".split())
    assert "data-frame-slider" not in html  # one frame: no slider
    assert "Explicit VR Little Endian" in html and "128 × 128" in html
    assert "data-wl-readout" in html


def test_viewer_partial_draws_findings_in_image_pixels(browser_client, worklist):
    instance = Instance.objects.filter(series__study=worklist["mr"], findings__isnull=False).get()
    url = reverse("studies:viewer", args=[worklist["mr"].study_instance_uid, instance.sop_instance_uid])
    html = browser_client.get(url, **HTMX).content.decode()
    assert f'viewBox="0 0 {instance.columns} {instance.rows}"' in html
    assert '<rect x="10.0" y="12.0" width="20.0" height="28.0"/>' in html
    assert "mass · Malignant" in html and "Findings (1)" in html
    presets = re.findall(r'<option value="(\w+)">', html)
    assert presets == ["default", "auto", "full"]  # MR: no CT windows


def test_viewer_partial_has_a_frame_slider_for_multiframe(browser_client, dicom_files):
    instance = ingest(dicom_files / "pydicom-data" / "emri_small.dcm", PatientName="Multi^Frame")
    url = reverse("studies:viewer", args=[instance.series.study.study_instance_uid, instance.sop_instance_uid])
    html = browser_client.get(url, **HTMX).content.decode()
    assert 'data-frames="10"' in html
    assert 'type="range" min="1" max="10" value="1"' in html and "1 / 10" in html


def test_viewer_without_htmx_redirects_to_the_study_page(browser_client, worklist):
    study = worklist["ct"]
    instance = Instance.objects.get(series__study=study)
    response = browser_client.get(reverse("studies:viewer", args=[study.study_instance_uid, instance.sop_instance_uid]))
    assert response.status_code == 302
    assert response["Location"] == f"{study.get_absolute_url()}?instance={instance.sop_instance_uid}"


def test_viewer_refuses_an_instance_of_another_study(browser_client, worklist):
    instance = Instance.objects.get(series__study=worklist["ct"])
    url = reverse("studies:viewer", args=[worklist["sr"].study_instance_uid, instance.sop_instance_uid])
    assert browser_client.get(url, **HTMX).status_code == 404
    missing = reverse("studies:viewer", args=[worklist["sr"].study_instance_uid, "1.2.3.4"])
    assert browser_client.get(missing, **HTMX).status_code == 404


def test_preview_the_viewer_asks_for_renders(browser_client, worklist):
    """The URL viewer.js builds answers a PNG with the window headers it reads."""
    instance = Instance.objects.get(series__study=worklist["ct"])
    url = reverse("api:instance-preview", args=[instance.sop_instance_uid])
    response = browser_client.get(url, {"frame": 1, "preset": "lung", "size": 2048})
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert (response["X-Window-Center"], response["X-Window-Width"]) == ("-600", "1500")
    dragged = browser_client.get(url, {"frame": 1, "preset": "lung", "size": 2048, "wc": 40.5, "ww": 380})
    assert (dragged["X-Window-Center"], dragged["X-Window-Width"]) == ("40.5", "380")


# --- upload ---------------------------------------------------------------------------


def test_upload_page_points_the_script_at_the_api(browser_client, settings):
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 5 * 1024**2
    response = browser_client.get(reverse("studies:upload"))
    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-endpoint="{reverse("api:instance-upload")}"' in html
    assert 'data-max-bytes="5242880"' in html
    assert f'data-study-url="{reverse("studies:detail", args=["0.0"])}"' in html
    assert "webkitdirectory" in html and "csrfmiddlewaretoken" in html and "js/upload.js" in html


def test_study_dates_render_as_iso(browser_client, ct_path):
    ingest(ct_path, StudyDate="19991231", AccessionNumber="OLD")
    response = browser_client.get(reverse("studies:list"), {"date_to": dt.date(2000, 1, 1).isoformat()})
    assert listed(response) == ["OLD"] and b"1999-12-31" in response.content
