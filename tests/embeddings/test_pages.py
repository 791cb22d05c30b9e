"""The search pages (htmx) with the Django test client: real PostgreSQL, real MIAS films
imported as DICOM, a real (tiny, untrained) encoder and a real FAISS index.

What the search returns is tested through the API in test_search.py; these tests check
what the pages do with it: which partial answers which request, what the filters send,
how errors and statuses read, and that feedback is stored with session auth and CSRF.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from embeddings import encoder as enc
from embeddings import services
from embeddings.models import EncoderVersion, SearchFeedback
from studies.datasets import mias
from studies.datasets.importer import import_conversion
from studies.models import Instance

pytestmark = pytest.mark.django_db

SEARCH = reverse("search:search")
COMPARE = reverse("search:compare")
FEEDBACK = reverse("search:feedback")
HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "search-results"}


@pytest.fixture
def archive(datasets: Path, django_capture_on_commit_callbacks):
    """12 MIAS films: 6 patients (right and left breast each), 4 of them with lesion boxes."""
    with django_capture_on_commit_callbacks(execute=True):
        import_conversion(mias.read(datasets / "mini-mias", limit=12), cohort="mias-small", progress=False)
    return Instance.objects.filter(series__modality="MG").select_related("series__study__patient").order_by("pk")


@pytest.fixture
def active(tmp_path: Path, archive) -> EncoderVersion:
    """A 64 px, 32-dim ResNet-18 (random weights), active, with the archive embedded."""
    model = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "tiny.pt", model)
    version = services.encoder_register(path=tmp_path / "tiny.pt", name="tiny")
    services.encoder_activate(encoder=version, wait=True)
    return version


def patient(instance: Instance) -> str:
    return instance.series.study.patient.patient_id


def uids(response) -> list[str]:
    return [card.result["sop_instance_uid"] for card in response.context["cards"]]


def lesion_image(archive) -> Instance:
    return next(i for i in archive if i.findings.filter(x0__isnull=False).exists())


# --- access -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [SEARCH, f"{SEARCH}?sop_instance_uid=1.2.3", f"{COMPARE}?result=1.2.3"])
def test_anonymous_users_are_sent_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith(f"{reverse('login')}?next=")


def test_anonymous_feedback_is_refused(client):
    response = client.post(FEEDBACK, {"result_sop_instance_uid": "1.2.3", "rank": 1, "score": 1, "relevant": 1})
    assert response.status_code == 302 and SearchFeedback.objects.count() == 0


def test_nav_links_to_the_search_page(browser_client):
    html = browser_client.get(reverse("studies:list")).content.decode()
    assert f'<a href="{SEARCH}">Similar cases</a>' in html
    assert f'<a href="{SEARCH}" aria-current="page">Similar cases</a>' in browser_client.get(SEARCH).content.decode()


def test_page_without_a_query_explains_how_to_start(browser_client, archive):
    response = browser_client.get(SEARCH)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Find similar" in html and 'name="file"' in html and "No query yet" in html
    assert response.context["results"] is None
    # The sidebar offers what the archive holds.
    assert '<option value="R">Right (R)</option>' in html and '<option value="mias-small">' in html
    assert '<option value="CIRC">CIRC</option>' in html and '<option value="MG">MG</option>' in html


# --- searching with a stored image ------------------------------------------------------------------


def test_search_by_instance_renders_k_results_without_the_patient(browser_client, active, archive):
    query = archive[0]
    response = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "k": 5})
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" in html and 'id="search-form"' in html and "Similar to this image" in html
    assert "{#" not in html and "{%" not in html  # no template comment leaks into the page
    cards = response.context["cards"]
    assert len(cards) == 5 and html.count("data-hit ") == 5
    assert all(card.result["patient_id"] != patient(query) for card in cards)
    assert [c.result["rank"] for c in cards] == [1, 2, 3, 4, 5]
    scores = [c.result["score"] for c in cards]
    assert scores == sorted(scores, reverse=True)
    for card in cards:
        assert reverse("api:instance-thumbnail", args=[card.result["sop_instance_uid"]]) in html
    # The query itself, as a thumbnail, links to its study.
    assert reverse("api:instance-thumbnail", args=[query.sop_instance_uid]) in html
    assert query.series.study.get_absolute_url() in html
    # Finding badges say the pathology with its colour class.
    assert re.search(r'class="path-badge (normal|benign|malignant|unknown)"', html)


def test_htmx_request_gets_only_the_results_and_a_clean_url(browser_client, active, archive):
    query = archive[0]
    form = {
        "sop_instance_uid": query.sop_instance_uid,
        "kind": "image",
        "k": "10",
        "exclude_same_patient": ["0", "1"],  # the hidden default, then the ticked checkbox
        "modality": "",
        "laterality": "R",
        "date_from": "",
    }
    response = browser_client.get(SEARCH, form, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and 'id="search-form"' not in html and "data-hit" in html
    assert "hx-swap-oob" not in html  # the query did not change: only the grid is swapped
    assert response["HX-Push-Url"] == f"{SEARCH}?sop_instance_uid={query.sop_instance_uid}&laterality=R"
    assert "HX-Request" in response["Vary"]


def test_filters_change_the_results(browser_client, active, archive):
    query = archive[0]
    right = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "laterality": "R", "k": 20}, **HTMX)
    expected = {i.sop_instance_uid for i in archive if i.laterality == "R" and patient(i) != patient(query)}
    assert set(uids(right)) == expected and len(expected) == 5
    assert {c.result["laterality"] for c in right.context["cards"]} == {"R"}
    left = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "laterality": "L", "k": 20}, **HTMX)
    assert {c.result["laterality"] for c in left.context["cards"]} == {"L"}
    malignant = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "pathology": "malignant"})
    for card in malignant.context["cards"]:
        assert any(f["pathology"] == "malignant" for f in card.result["findings"])
    assert 'value="malignant" selected' in malignant.content.decode()


def test_same_patient_is_left_out_unless_unticked(browser_client, active, archive):
    query = archive[0]
    other_breast = next(i for i in archive if patient(i) == patient(query) and i.pk != query.pk)
    default = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "k": 11})
    assert other_breast.sop_instance_uid not in uids(default) and len(uids(default)) == 10
    unticked = browser_client.get(
        SEARCH, {"sop_instance_uid": query.sop_instance_uid, "k": 11, "exclude_same_patient": "0"}, **HTMX
    )
    assert other_breast.sop_instance_uid in uids(unticked) and len(uids(unticked)) == 11
    assert query.sop_instance_uid not in uids(unticked)
    assert "exclude_same_patient=0" in unticked["HX-Push-Url"] and "k=11" in unticked["HX-Push-Url"]


def test_box_query_shows_region_hits_with_their_boxes(browser_client, active, archive):
    query = lesion_image(archive)
    response = browser_client.get(
        SEARCH, {"sop_instance_uid": query.sop_instance_uid, "box": "300,300,500,500", "k": 3}
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert response.context["results"].kind == "region" and "Similar to this region" in html
    assert '<input type="radio" name="kind" value="region" checked>' in html
    # The query box is drawn on the query's thumbnail, in its image pixels.
    assert f'viewBox="0 0 {query.columns} {query.rows}"' in html
    assert '<rect class="query-box" x="300.0" y="300.0" width="200.0" height="200.0"/>' in html
    cards = response.context["cards"]
    assert 0 < len(cards) <= 3
    for card in cards:
        box = card.result["box"]
        assert box is not None and card.result["finding"] is not None
        x0, y0, x1, y1 = box
        assert f'<rect class="hit-box" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}"/>' in html
        assert "rbox=" in card.compare_url and "qbox=300%2C300%2C500%2C500" in card.compare_url
    # Whole images instead, for the same box, and back to the whole image.
    images = browser_client.get(
        SEARCH, {"sop_instance_uid": query.sop_instance_uid, "box": "300,300,500,500", "kind": "image"}, **HTMX
    )
    assert images.context["results"].kind == "image" and "kind=image" in images["HX-Push-Url"]
    assert f"{SEARCH}?sop_instance_uid={query.sop_instance_uid}" in html  # "search the whole image"


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"box": "0,0,5000,10"}, 400, "is outside the 1024×1024 image"),
        ({"box": "-5,0,10,10"}, 400, "outside"),
        ({"box": "10,10,10,40"}, 400, "zero area"),
        ({"box": "1,2,3"}, 400, "box must be four numbers"),
        ({"box": "a,b,c,d"}, 400, "box must be four numbers"),
        ({"k": "101"}, 400, "Number of results: Ensure this value is less than or equal to 100."),
        ({"k": "0"}, 400, "Number of results"),
        ({"k": "many"}, 400, "A valid integer is required"),
        ({"kind": "organ"}, 400, "Search in"),
        ({"date_from": "2020-13-45"}, 400, "From: Date has wrong format"),
        ({"sop_instance_uid": "1.2.3.4"}, 404, "no instance with SOPInstanceUID 1.2.3.4"),
    ],
)
def test_bad_input_is_shown_in_the_page(browser_client, active, archive, params, status, message):
    query = {"sop_instance_uid": archive[0].sop_instance_uid, **params}
    page = browser_client.get(SEARCH, query)
    assert page.status_code == status
    html = page.content.decode()
    assert "<html" in html and 'role="alert"' in html and message in html
    assert "data-hit" not in html
    partial = browser_client.get(SEARCH, query, **HTMX)
    assert partial.status_code == status and message in partial.content.decode()
    assert "HX-Push-Url" not in partial  # a bad search does not become the page's URL


def test_search_before_any_encoder_says_why(browser_client, archive):
    response = browser_client.get(SEARCH, {"sop_instance_uid": archive[0].sop_instance_uid})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-search-status="no_encoder"' in html and "train_encoder" in html and "data-hit" not in html


def test_search_of_an_empty_index_says_why(browser_client, tmp_path, datasets):
    model = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "tiny.pt", model)
    services.encoder_activate(encoder=services.encoder_register(path=tmp_path / "tiny.pt", name="tiny"), wait=True)
    png = (datasets / "mini-mias" / "images" / "mdb003.png").read_bytes()
    response = browser_client.post(SEARCH, {"file": SimpleUploadedFile("q.png", png, "image/png")}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-search-status="empty_index"' in html and "no image embeddings yet" in html


def test_no_image_passing_the_filters_is_said_plainly(browser_client, active, archive):
    response = browser_client.get(SEARCH, {"sop_instance_uid": archive[0].sop_instance_uid, "laterality": "B"})
    assert response.status_code == 200
    assert "no images pass the filters" in response.content.decode()
    # A value the archive lacks (from a shared URL) stays selected in its menu.
    assert '<option value="B" selected>B</option>' in response.content.decode()


# --- searching with an upload ------------------------------------------------------------------


def test_upload_png_searches_and_swaps_the_query_in(browser_client, active, archive, datasets):
    png = (datasets / "mini-mias" / "images" / "mdb003.png").read_bytes()
    form = {"file": SimpleUploadedFile("mdb003.png", png, "image/png"), "k": "4", "laterality": "L"}
    # hx-include sends the filter form's stored-image query too: the upload wins.
    form["sop_instance_uid"] = archive[0].sop_instance_uid
    response = browser_client.post(SEARCH, form, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert len(response.context["cards"]) == 4
    assert {c.result["laterality"] for c in response.context["cards"]} == {"L"}
    assert 'data-query-mode="upload"' in html
    # The query above the grid changes to the upload, and the filter form forgets the stored image.
    assert '<div id="search-query" class="search-query" hx-swap-oob="true">' in html and "mdb003.png" in html
    assert '<div id="search-query-inputs" hx-swap-oob="true">' in html
    assert 'name="sop_instance_uid"' not in html
    assert response["HX-Push-Url"] == SEARCH
    # Without JavaScript the form posts to the whole page.
    form["file"] = SimpleUploadedFile("mdb003.png", png, "image/png")
    page = browser_client.post(SEARCH, form)
    assert page.status_code == 200 and "<html" in page.content.decode() and len(page.context["cards"]) == 4


def test_undecodable_upload_is_400_with_the_reason(browser_client, active, archive):
    garbage = SimpleUploadedFile("broken.png", b"\x89PNG garbage" * 10, "image/png")
    response = browser_client.post(SEARCH, {"file": garbage}, **HTMX)
    assert response.status_code == 400 and "cannot decode the upload" in response.content.decode()
    empty = browser_client.post(SEARCH, {}, **HTMX)
    assert empty.status_code == 400 and "choose a DICOM, PNG or JPEG file" in empty.content.decode()


# --- feedback -------------------------------------------------------------------------------


def test_feedback_is_stored_with_session_auth_and_csrf(user, active, archive):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    query, result = archive[0], archive[3]
    page = client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "k": 3})
    html = page.content.decode()
    token = client.cookies["csrftoken"].value
    assert 'hx-headers=\'{"X-CSRFToken": "' in html  # htmx sends the token with every request
    assert f'hx-post="{FEEDBACK}"' in html and html.count('name="relevant" value="1"') == 3
    form = {
        "key": "1-x",
        "query_sop_instance_uid": query.sop_instance_uid,
        "query_box": "",
        "result_sop_instance_uid": result.sop_instance_uid,
        "result_box": "10,20,110,120",
        "rank": "2",
        "score": "0.875",
        "relevant": "1",
    }
    assert client.post(FEEDBACK, form, HTTP_HX_REQUEST="true").status_code == 403  # no token
    response = client.post(FEEDBACK, form, HTTP_HX_REQUEST="true", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200
    body = response.content.decode()
    assert "Saved" in body and 'class="yes" aria-pressed="true"' in body and 'data-key="1-x"' in body
    row = SearchFeedback.objects.get()
    assert row.user == user and row.relevant and row.encoder == active and row.rank == 2
    assert row.query_instance == query and row.result_instance == result and row.query_box is None
    assert row.result_box == [10, 20, 110, 120] and row.score == pytest.approx(0.875)
    # "Not relevant" stores a verdict too; an upload query has no query instance.
    form.update(relevant="0", query_sop_instance_uid="", result_box="")
    assert client.post(FEEDBACK, form, HTTP_HX_REQUEST="true", HTTP_X_CSRFTOKEN=token).status_code == 200
    latest = SearchFeedback.objects.latest("pk")
    assert not latest.relevant and latest.query_instance is None and latest.result_box is None


def test_a_verdict_given_shows_when_the_reader_comes_back(user, active, archive, django_user_model):
    """The search page and the comparison show the reader's latest verdict on a result of
    the same query, so nobody rates the same results again without knowing."""
    client = Client()
    client.force_login(user)
    query = archive[0]
    params = {"sop_instance_uid": query.sop_instance_uid, "k": 3, "exclude_same_patient": "false"}
    html = client.get(SEARCH, params).content.decode()
    assert 'aria-pressed="true"' not in html
    first = re.search(r'name="result_sop_instance_uid" value="([^"]+)"', html).group(1)
    form = {"query_sop_instance_uid": query.sop_instance_uid, "query_box": "", "result_sop_instance_uid": first,
            "result_box": "", "rank": "1", "score": "0.5"}  # fmt: skip
    for relevant in ("1", "0"):  # the latest verdict counts
        assert client.post(FEEDBACK, {**form, "relevant": relevant}, HTTP_HX_REQUEST="true").status_code == 200
    again = client.get(SEARCH, params).content.decode()
    assert again.count('class="no" aria-pressed="true"') == 1 and 'class="yes" aria-pressed="true"' not in again
    compare = client.get(COMPARE, {"query": query.sop_instance_uid, "result": first, "rank": "1", "score": "0.5"})
    assert 'class="no" aria-pressed="true"' in compare.content.decode()
    # Another reader's verdict is theirs.
    other = django_user_model.objects.create_user("other-reader", password="a-long-test-password")
    from access.services import role_grant

    role_grant(user=other, roles=["radiologist"])
    client.force_login(other)
    assert 'aria-pressed="true"' not in client.get(SEARCH, params).content.decode()


def test_bad_feedback_says_why(browser_client, active, archive):
    form = {"result_sop_instance_uid": archive[0].sop_instance_uid, "rank": "0", "score": "x", "relevant": "1"}
    response = browser_client.post(FEEDBACK, form, HTTP_HX_REQUEST="true")
    assert (
        response.status_code == 400 and "Ensure this value is greater than or equal to 1" in response.content.decode()
    )
    form.update(rank="1", score="0.5", result_sop_instance_uid="1.2.3.4")
    assert browser_client.post(FEEDBACK, form, HTTP_HX_REQUEST="true").status_code == 404
    assert SearchFeedback.objects.count() == 0


# --- comparison ------------------------------------------------------------------------------


def test_result_opens_a_comparison_of_both_images(browser_client, active, archive):
    query = lesion_image(archive)
    page = browser_client.get(SEARCH, {"sop_instance_uid": query.sop_instance_uid, "box": "300,300,500,500", "k": 2})
    card = page.context["cards"][0]
    assert f'hx-get="{card.compare_url.replace("&", "&amp;")}" hx-target="#compare-slot"' in page.content.decode()
    params = {k: v[0] for k, v in parse_qs(urlsplit(card.compare_url).query).items()}
    assert params["query"] == query.sop_instance_uid and params["result"] == card.result["sop_instance_uid"]

    response = browser_client.get(card.compare_url, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="compare-slot")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and "compare-overlay" in html and "data-compare-close" in html
    assert "{#" not in html and "{%" not in html
    assert html.count("data-viewer ") == 2
    for uid in (query.sop_instance_uid, card.result["sop_instance_uid"]):
        assert f'data-preview-url="{reverse("api:instance-preview", args=[uid])}"' in html
    assert 'id="compare-wl-query"' in html and 'id="compare-wl-result"' in html  # one W/L filter each
    # The query box and the matched lesion's box, drawn in image pixels; ground truth too.
    assert '<rect class="search-box" data-search-box x="300.0" y="300.0" width="200.0" height="200.0"/>' in html
    x0, y0, x1, y1 = card.result["box"]
    assert f'x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}"' in html
    assert 'class="finding ' in html and "data-compare-findings" in html
    # Shared toolbar, linked panes, and the verdict buttons for this result.
    assert "data-compare-link" in html and 'data-compare-tool="wl"' in html
    assert f'hx-post="{FEEDBACK}"' in html and f'name="rank" value="{card.result["rank"]}"' in html

    # The same URL without htmx is a page of its own that can be shared.
    full = browser_client.get(card.compare_url)
    assert full.status_code == 200
    assert "<html" in full.content.decode() and full.content.decode().count("data-viewer ") == 2
    assert "js/compare.js" in full.content.decode()


def test_comparison_of_an_upload_shows_the_result_alone(browser_client, active, archive):
    response = browser_client.get(COMPARE, {"result": archive[1].sop_instance_uid, "rank": 1, "score": 0.5})
    html = response.content.decode()
    assert response.status_code == 200 and html.count("data-viewer ") == 1 and "not stored" in html


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"result": "1.2.3.4"}, 404, "no instance with SOPInstanceUID 1.2.3.4"),
        ({}, 400, "choose a result"),
        ({"result": "RESULT", "rbox": "1,2"}, 400, "rbox must be four numbers"),
    ],
)
def test_bad_comparison_is_explained(browser_client, archive, params, status, message):
    params = {k: archive[0].sop_instance_uid if v == "RESULT" else v for k, v in params.items()}
    response = browser_client.get(COMPARE, params)
    assert response.status_code == status and message in response.content.decode()


# --- the viewer's hooks ------------------------------------------------------------------------


def test_viewer_offers_find_similar_and_the_box_tool(browser_client, archive):
    instance = lesion_image(archive)
    study = instance.series.study
    url = reverse("studies:viewer", args=[study.study_instance_uid, instance.sop_instance_uid])
    html = browser_client.get(url, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="viewer-slot").content.decode()
    # Priors of the image's own modality, which the sidebar shows chosen and can widen.
    search_url = f"{SEARCH}?sop_instance_uid={instance.sop_instance_uid}&amp;modality={instance.series.modality}"
    assert instance.series.modality
    assert f'data-find-similar href="{search_url}"' in html
    assert f'data-find-lesions data-href="{search_url}" aria-disabled="true"' in html
    assert 'data-tool="box"' in html and "data-selection-rect" in html
    assert "{#" not in html and "{%" not in html
    # The box is drawn in true image pixels, like the findings and the detector's boxes.
    assert html.count(f'viewBox="0 0 {instance.columns} {instance.rows}"') == 3
