"""The worklist page (htmx) and the API over the same selector: order, filters, read
marks, the polling bar, errors. Studies are real files ingested and triaged on arrival."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from studies.models import Finding, Study
from triage import services
from triage.models import Category, StudyRead

pytestmark = pytest.mark.django_db

HTMX_LIST = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "worklist-results"}
HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def studies(ingest, mammogram, make_dicom, film, user, django_capture_on_commit_callbacks) -> dict[str, Study]:
    """One study per worklist section, arriving in this order (oldest first):
    negative, routine, pending MG, CT (outside triage), blank MG (not assessable),
    urgent, suspicious."""

    def mg(name: str, **attributes) -> Study:
        return ingest(mammogram(patient_id=name, **attributes)).series.study

    made = {"negative": mg("NEG"), "routine": mg("ROUTINE"), "pending": mg("PENDING", StudyDate="20230301")}
    made["ct"] = ingest(make_dicom(PatientID="CT-1", StudyDate="20240105")).series.study
    made["blank"] = ingest(mammogram(np.full_like(film, 12), patient_id="BLANK")).series.study
    made["urgent"] = mg("URGENT")
    made["suspicious"] = mg("SUSPICIOUS")
    services.triage_override(study=made["negative"], category=Category.LIKELY_NEGATIVE, user=user)
    services.triage_override(study=made["routine"], category=Category.ROUTINE, user=user)
    for key, pathology, cls in (("urgent", "malignant", "SPIC"), ("suspicious", "unknown", "ARCH")):
        instance = made[key].series.first().instances.first()
        with django_capture_on_commit_callbacks(execute=True):
            Finding.objects.create(instance=instance, pathology=pathology, abnormality_class=cls, source="radiologist")
    return made


# A blank mammogram is a technical failure (read early: the patient may be recalled); a
# CT is not assessable only in that no triage task covers it, so it is read by arrival.
READING_ORDER = ["urgent", "suspicious", "blank", "routine", "pending", "ct", "negative"]


def uids(made: dict[str, Study], keys: list[str]) -> list[str]:
    return [made[key].study_instance_uid for key in keys]


def page_uids(html: str) -> list[str]:
    return re.findall(r'hx-post="/worklist/([0-9.]+)/read/"', html)


def test_reading_order_is_the_same_on_the_page_and_in_the_api(studies, api, browser_client):
    body = api.get("/api/v1/worklist/").json()
    assert [item["study_instance_uid"] for item in body["results"]] == uids(studies, READING_ORDER)
    assert body["count"] == 7
    urgent = body["results"][0]
    assert urgent["category"] == "urgent" and urgent["section"] == "Urgent"
    assert urgent["reasons"] == ["radiologist finding of an urgent class: malignant SPIC"]
    assert urgent["patient"]["patient_id"] == "URGENT" and urgent["modalities"] == ["MG"]
    assert urgent["scores"] == {} and urgent["read"] is False and urgent["qa_read"] is False
    assert urgent["url"] == f"/studies/{urgent['study_instance_uid']}/"
    by_uid = {item["study_instance_uid"]: item for item in body["results"]}
    blank, ct = by_uid[studies["blank"].study_instance_uid], by_uid[studies["ct"].study_instance_uid]
    assert (blank["category"], blank["section"]) == ("not_assessable", "Not assessable")
    assert (ct["category"], ct["section"]) == ("not_assessable", "Routine, awaiting or outside triage")
    assert ct["reasons"] == ["not a mammogram or chest radiograph (modality CT)"]

    response = browser_client.get("/worklist/")
    assert response.status_code == 200
    html = response.content.decode()
    assert page_uids(html) == uids(studies, READING_ORDER)
    # Every section is announced, likely negative included; each row links to its study.
    for title in ("Urgent", "Suspicious", "Not assessable", "Routine, awaiting or outside triage", "Likely negative"):
        assert title in html
    assert f'href="/studies/{studies["urgent"].study_instance_uid}/"' in html
    assert "badge triage-likely_negative" in html and "blank image" in html
    # The CT's row says why it is read by arrival; the blank mammogram keeps its category.
    ct_row = html[html.index(f'id="worklist-{studies["ct"].pk}"') :].split("</tr>")[0]
    blank_row = html[html.index(f'id="worklist-{studies["blank"].pk}"') :].split("</tr>")[0]
    assert "badge triage-outside" in ct_row and "Outside triage" in ct_row
    assert "badge triage-not_assessable" in blank_row and "Not assessable" in blank_row


def test_filters_agree_between_page_and_api(studies, api, browser_client):
    cases = [
        ("modality=CT", ["ct"]),
        ("category=urgent&category=likely_negative", ["urgent", "negative"]),
        ("date_from=2023-01-01&date_to=2023-12-31", ["pending"]),
        ("modality=MG&category=not_assessable", ["blank"]),
    ]
    for query, expected in cases:
        api_uids = [item["study_instance_uid"] for item in api.get(f"/api/v1/worklist/?{query}").json()["results"]]
        html = browser_client.get(f"/worklist/?{query}", **HTMX_LIST).content.decode()
        assert api_uids == page_uids(html) == uids(studies, expected), query


def test_bad_filters_are_400_in_the_api_and_reported_on_the_page(studies, api, browser_client):
    for query in ("date_from=yesterday", "category=later", "date_from=2024-02-01&date_to=2024-01-01", "modality=M;G"):
        response = api.get(f"/api/v1/worklist/?{query}")
        assert response.status_code == 400, query
        assert "error" in response.json()
    html = browser_client.get("/worklist/?category=later").content.decode()
    assert "(ignored)" in html and len(page_uids(html)) == 7


def test_read_marks_hide_studies_until_shown(studies, api, browser_client):
    uid = studies["urgent"].study_instance_uid
    response = browser_client.post(f"/worklist/{uid}/read/", {"read": "1"}, **HTMX)
    row = response.content.decode()
    # The row comes back dimmed with an undo, so the rows around it do not move.
    assert response.status_code == 200 and "is-read" in row and "Mark unread" in row
    assert StudyRead.objects.get(study=studies["urgent"]).user.username == "reader"
    assert uid not in page_uids(browser_client.get("/worklist/").content.decode())
    assert uid not in [i["study_instance_uid"] for i in api.get("/api/v1/worklist/").json()["results"]]
    shown = api.get("/api/v1/worklist/?include_read=true").json()["results"]
    assert shown[0]["study_instance_uid"] == uid and shown[0]["read"] is True and shown[0]["read_by"] == "reader"
    assert uid in page_uids(browser_client.get("/worklist/?include_read=on").content.decode())

    row = browser_client.post(f"/worklist/{uid}/read/", {"read": "0"}, **HTMX).content.decode()
    assert "Mark read" in row and not StudyRead.objects.exists()
    # Without htmx (no JavaScript) the form posts and comes back to the worklist.
    response = browser_client.post(f"/worklist/{uid}/read/", {"read": "1"})
    assert response.status_code == 302 and response["Location"] == "/worklist/"


def test_qa_read_studies_are_flagged_read_anyway(ingest, mammogram, user, settings, api, browser_client):
    settings.PRECEDENT_TRIAGE_QA_FRACTION = 1.0
    study = ingest(mammogram()).series.study
    services.triage_override(study=study, category=Category.LIKELY_NEGATIVE, user=user)
    assert api.get("/api/v1/worklist/").json()["results"][0]["qa_read"] is True
    html = browser_client.get("/worklist/").content.decode()
    assert "read anyway (QA)" in html and "(1 to read anyway)" in html


def test_the_polling_bar_announces_new_and_flagged_studies(studies, browser_client, ingest, mammogram):
    html = browser_client.get("/worklist/").content.decode()
    assert 'hx-trigger="every 10s"' in html and 'hx-swap="outerHTML"' in html
    since = re.search(r'since=([^"&]+)"', html).group(1)
    quiet = browser_client.get(f"/worklist/changes/?since={since}", **HTMX).content.decode()
    assert "new stud" not in quiet and 'id="worklist-changes"' in quiet  # keeps polling

    ingest(mammogram(patient_id="LATE"))
    bar = browser_client.get(f"/worklist/changes/?since={since}", **HTMX).content.decode()
    assert "1 new study" in bar and "Show" in bar and f"since={since}" in bar
    # The bar counts only what the filters would show.
    assert "new stud" not in browser_client.get(f"/worklist/changes/?modality=CT&since={since}").content.decode()
    for garbled in ("2024-13-45T00:00:00", "yesterday", ""):
        assert "new stud" not in browser_client.get("/worklist/changes/", {"since": garbled}).content.decode()
    earlier = (timezone.now() - dt.timedelta(hours=1)).isoformat()
    bar = browser_client.get("/worklist/changes/", {"since": earlier}).content.decode()
    assert "8 new studies" in bar and "2 flagged urgent or suspicious" in bar


def test_the_study_triage_api_gives_current_history_and_images(studies, api):
    uid = studies["urgent"].study_instance_uid
    body = api.get(f"/api/v1/studies/{uid}/triage/").json()
    assert body["category"] == "urgent" and body["current"]["is_current"] is True
    assert [r["category"] for r in body["history"]] == ["urgent", "pending"]
    assert body["images"][0]["assessable"] is True and body["images"][0]["task"] == "mammography"
    assert body["read"] is False

    response = api.get("/api/v1/studies/1.2.3.4/triage/")
    assert response.status_code == 404 and response.json() == {"error": "No study with StudyInstanceUID 1.2.3.4"}


def test_a_radiologist_can_set_the_category_over_the_api(studies, api):
    uid = studies["pending"].study_instance_uid
    response = api.post(f"/api/v1/studies/{uid}/triage/", {"category": "suspicious", "note": "palpable lump"})
    assert response.status_code == 201
    assert response.json()["current"]["reasons"] == ["category set by hand by reader: palpable lump"]
    assert response.json()["current"]["overridden_by"] == "reader"
    bad = api.post(f"/api/v1/studies/{uid}/triage/", {"category": "pending"})
    assert bad.status_code == 400 and "category" in bad.json()["error"]


def test_authentication_is_required(studies, client):
    anonymous = APIClient()
    assert anonymous.get("/api/v1/worklist/").status_code == 401
    uid = studies["urgent"].study_instance_uid
    assert anonymous.get(f"/api/v1/studies/{uid}/triage/").status_code == 401
    response = client.get("/worklist/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_evidence_is_empty_without_an_active_encoder(studies, browser_client):
    uid = studies["urgent"].study_instance_uid
    assert f'hx-get="/worklist/{uid}/evidence/"' in browser_client.get("/worklist/").content.decode()
    response = browser_client.get(f"/worklist/{uid}/evidence/", **HTMX)
    assert response.status_code == 200 and "Similar confirmed cases" not in response.content.decode()


@pytest.fixture
def fresh_indexes():
    """No serving index from another test's encoder in this process, as in a new process."""
    from embeddings import services as embedding_services

    embedding_services.forget_indexes()
    yield
    embedding_services.forget_indexes()


def test_flagged_studies_show_similar_confirmed_cases(
    datasets, tmp_path, ingest, mammogram, browser_client, django_capture_on_commit_callbacks, fresh_indexes
):
    from embeddings import encoder as enc
    from embeddings import services as embedding_services
    from studies.datasets import mias
    from studies.datasets.importer import import_conversion

    with django_capture_on_commit_callbacks(execute=True):
        import_conversion(mias.read(datasets / "mini-mias", limit=8), cohort="mias-small", progress=False)
    model = enc.build_encoder("resnet18", dim=16, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "tiny.pt", model)
    version = embedding_services.encoder_register(path=tmp_path / "tiny.pt", name="tiny")
    embedding_services.encoder_activate(encoder=version, wait=True)

    instance = ingest(mammogram(patient_id="FLAGGED"))
    # The same pixels as another patient's chest film with a confirmed outcome: the nearest
    # image there is, and no evidence for a mammogram.
    film = ingest(mammogram(patient_id="CHEST", Modality="DX", BodyPartExamined="CHEST"))
    Finding.objects.create(instance=film, pathology="benign", abnormality_class="nodule", source="dataset")
    with django_capture_on_commit_callbacks(execute=True):
        Finding.objects.create(instance=instance, pathology="malignant", abnormality_class="SPIC", source="radiologist")
    uid = instance.series.study.study_instance_uid
    html = browser_client.get(f"/worklist/{uid}/evidence/", **HTMX).content.decode()
    assert "Similar confirmed cases" in html
    links = re.findall(r'href="/studies/([0-9.]+)/\?instance=', html)
    assert len(links) == 3 and uid not in links
    # Evidence for a mammogram is other mammograms, whatever else the index holds.
    assert film.series.study.study_instance_uid not in links
    assert set(Study.objects.filter(study_instance_uid__in=links).values_list("series__modality", flat=True)) == {"MG"}
    assert set(re.findall(r'class="badge (\w+)"', html)) <= {"malignant", "benign", "normal"}


def test_rows_show_the_exam_scores(studies, browser_client):
    """A TriageResult keeps its numbers nested (exam, breasts, images); the row shows
    the exam's, under names a radiologist reads."""
    from triage.models import TriageResult
    from triage.views import score_items

    fused = {"exam": {"p_abnormal": 0.4, "p_malignant": 0.1, "p_detector": 0.5, "score": 0.7}, "score_source": "fused",
             "breasts": {"L": {"p_abnormal": 0.4}}, "images": {"1.2": {"p_abnormal": 0.4}}}  # fmt: skip
    assert score_items(fused) == [("fused", 0.7), ("P(abnormal)", 0.4), ("P(malignant)", 0.1), ("best box", 0.5)]
    assert score_items({"exam": {"p_detector": 0.3, "score": 0.3}, "score_source": "detector"}) == [("best box", 0.3)]
    assert score_items({}) == [] and score_items(None) == []

    study = next(iter(studies.values()))
    TriageResult.objects.filter(study=study, is_current=True).update(scores=fused)
    html = browser_client.get("/worklist/").text
    row = html[html.index(f'id="worklist-{study.pk}"') :]
    cell = row[row.index('<td class="scores">') : row.index("</td>", row.index('<td class="scores">'))]
    assert "P(abnormal) <strong>0.40</strong>" in cell and "fused <strong>0.70</strong>" in cell
