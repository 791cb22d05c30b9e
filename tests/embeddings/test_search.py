"""The embedding pipeline, the serving index and POST /api/v1/search/, on real images.

A small real encoder (ResNet-18, 64 px, random weights) is enough to test the
plumbing: what is embedded, what is searched, what filters and errors do. Retrieval
quality is measured by `evaluate_retrieval`, not here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from embeddings import encoder as enc
from embeddings import selectors, services
from embeddings.models import Embedding, EmbeddingTombstone, EncoderVersion
from studies import services as study_services
from studies.datasets import mias
from studies.datasets.importer import import_conversion
from studies.models import Finding, Instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiny_encoder(tmp_path: Path) -> Path:
    model = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
    path = tmp_path / "tiny.pt"
    enc.save_encoder(path, model)
    return path


@pytest.fixture
def archive(datasets: Path, django_capture_on_commit_callbacks):
    """12 MIAS films (6 patients, 4 with lesions) imported as DICOM with their boxes."""
    with django_capture_on_commit_callbacks(execute=True):
        import_conversion(mias.read(datasets / "mini-mias", limit=12), cohort="mias-small", progress=False)
    return Instance.objects.filter(series__modality="MG").order_by("pk")


@pytest.fixture
def active(tiny_encoder: Path, archive) -> EncoderVersion:
    version = services.encoder_register(path=tiny_encoder, name="tiny")
    services.encoder_activate(encoder=version, wait=True)
    version.refresh_from_db()
    return version


def test_activation_embeds_images_and_finding_boxes(active, archive):
    assert active.status == EncoderVersion.Status.ACTIVE
    assert Embedding.objects.filter(kind="image").count() == archive.count() == 12
    boxes = Finding.objects.filter(instance__in=archive, x0__isnull=False).count()
    assert boxes > 0 and Embedding.objects.filter(kind="region").count() == boxes
    vector = Embedding.objects.first().as_array()
    assert vector.shape == (32,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    # The index was built and saved beside its manifest.
    manifest = (services.index_dir(active, "image") / "manifest.json").read_text()
    assert '"count": 12' in manifest


def test_new_instance_is_embedded_after_ingest(active, make_dicom, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        result = study_services.instance_ingest(source=io.BytesIO(make_dicom()))
    assert Embedding.objects.filter(instance=result.instance, kind="image", encoder=active).count() == 1


def test_segmentations_are_not_embedded(active, make_dicom, django_capture_on_commit_callbacks):
    """A SEG carries pixel data, but it is a mask over another image: never a similar case."""

    def as_segmentation(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
        ds.Modality = "SEG"

    with django_capture_on_commit_callbacks(execute=True):
        seg = study_services.instance_ingest(source=io.BytesIO(make_dicom(transform=as_segmentation))).instance
    assert seg.has_pixel_data and not seg.is_image
    assert not Embedding.objects.filter(instance=seg).exists()
    assert not services.pending_instances(active).filter(pk=seg.pk).exists()


def test_search_by_instance_excludes_the_patient_and_ranks(api, active, archive):
    query = archive.first()
    response = api.post("/api/v1/search/", {"sop_instance_uid": query.sop_instance_uid, "k": 5}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["encoder"] == "tiny" and body["kind"] == "image"
    results = body["results"]
    assert len(results) == 5
    patient = query.series.study.patient.patient_id
    assert all(r["patient_id"] != patient for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # The scores are cosine similarities of the stored vectors.
    q = Embedding.objects.get(instance=query, kind="image").as_array()
    top = Embedding.objects.get(instance__sop_instance_uid=results[0]["sop_instance_uid"], kind="image").as_array()
    assert results[0]["score"] == pytest.approx(float(q @ top), abs=1e-4)
    assert results[0]["thumbnail_url"].endswith("/thumbnail.png")


def test_same_patient_included_when_asked(api, active, archive):
    query = archive.first()
    body = api.post(
        "/api/v1/search/",
        {"sop_instance_uid": query.sop_instance_uid, "k": 11, "exclude_same_patient": False},
        format="json",
    ).json()
    assert len(body["results"]) == 11  # every other image, the patient's other breast included
    assert query.sop_instance_uid not in {r["sop_instance_uid"] for r in body["results"]}


def test_filters_never_return_fewer_than_k_when_k_match(api, active, archive):
    query = archive.first()
    right = Instance.objects.filter(laterality="R").exclude(series__study__patient=query.series.study.patient)
    body = api.post(
        "/api/v1/search/",
        {"sop_instance_uid": query.sop_instance_uid, "k": right.count(), "laterality": "R"},
        format="json",
    ).json()
    assert {r["sop_instance_uid"] for r in body["results"]} == {i.sop_instance_uid for i in right}
    malignant = api.post(
        "/api/v1/search/",
        {"sop_instance_uid": query.sop_instance_uid, "k": 10, "pathology": "malignant"},
        format="json",
    ).json()["results"]
    for result in malignant:
        assert any(f["pathology"] == "malignant" for f in result["findings"])


def test_box_query_searches_lesions(api, active, archive):
    query = archive.first()
    response = api.post(
        "/api/v1/search/",
        {
            "sop_instance_uid": query.sop_instance_uid,
            "box": [300, 300, 500, 500],
            "k": 3,
            "exclude_same_patient": False,
        },
        format="json",
    )
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "region" and body["query"]["box"] == [300, 300, 500, 500]
    assert len(body["results"]) == 3
    assert all(r["box"] is not None and r["finding"] is not None for r in body["results"])


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        ({"box": [0, 0, 0, 10]}, 400, "zero area"),
        ({"box": [-5, 0, 10, 10]}, 400, "outside"),
        ({"box": [0, 0, 5000, 10]}, 400, "outside"),
        ({"box": [0, 0, 10]}, 400, "box"),
        ({"k": 0}, 400, "k"),
        ({"k": 101}, 400, "k"),
        ({"sop_instance_uid": "1.2.3.4"}, 404, "no instance"),
        ({"sop_instance_uid": ""}, 400, ""),
    ],
)
def test_bad_queries(api, active, archive, payload, status, reason):
    body = {"sop_instance_uid": archive.first().sop_instance_uid, **payload}
    response = api.post("/api/v1/search/", body, format="json")
    assert response.status_code == status
    assert reason in response.json()["error"]


def test_search_before_any_encoder_says_why(api, archive):
    response = api.post("/api/v1/search/", {"sop_instance_uid": archive.first().sop_instance_uid}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "no_encoder" and body["results"] == [] and "train_encoder" in body["message"]


def test_upload_png_and_dicom_as_query(api, active, archive, datasets):
    png = (datasets / "mini-mias" / "images" / "mdb003.png").read_bytes()
    response = api.post("/api/v1/search/", {"file": _file("q.png", png), "k": 4}, format="multipart")
    assert response.status_code == 200 and len(response.json()["results"]) == 4
    dcm = (datasets / "dicom-test-files" / "pydicom-test_files" / "CT_small.dcm").read_bytes()
    response = api.post("/api/v1/search/", {"file": _file("q.dcm", dcm), "k": 2}, format="multipart")
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_undecodable_upload_is_400(api, active, archive, datasets):
    response = api.post("/api/v1/search/", {"file": _file("q.png", b"\x89PNG garbage" * 10)}, format="multipart")
    assert response.status_code == 400 and "cannot decode" in response.json()["error"]
    sr = (datasets / "dicom-test-files" / "pydicom-test_files" / "test-SR.dcm").read_bytes()
    response = api.post("/api/v1/search/", {"file": _file("sr.dcm", sr)}, format="multipart")
    assert response.status_code == 400 and "no pixel data" in response.json()["error"]


def test_deleted_instances_leave_the_index(api, active, archive):
    query, gone = archive[0], archive[5]
    services.serving_index(active, "image")  # loaded in this process before the delete
    gone_uid = gone.sop_instance_uid
    gone.delete()
    assert EmbeddingTombstone.objects.filter(encoder=active, kind="image").count() == 1
    body = api.post("/api/v1/search/", {"sop_instance_uid": query.sop_instance_uid, "k": 20}, format="json").json()
    assert gone_uid not in {r["sop_instance_uid"] for r in body["results"]}
    assert len(services.serving_index(active, "image")) == 11


def test_saved_index_is_reloaded_and_caught_up(active, archive, make_dicom, django_capture_on_commit_callbacks):
    services.serving_index(active, "image", save=True)
    services.forget_indexes()  # as a new process would start
    with django_capture_on_commit_callbacks(execute=True):
        study_services.instance_ingest(source=io.BytesIO(make_dicom()))
    index = services.serving_index(active, "image")
    assert len(index) == Embedding.objects.filter(kind="image").count() == 13


def test_corrupt_index_file_is_rebuilt(active, archive):
    services.serving_index(active, "image", save=True)
    services.forget_indexes()
    index_file = next(p for p in services.index_dir(active, "image").iterdir() if p.name != "manifest.json")
    index_file.write_bytes(b"garbage")
    assert len(services.serving_index(active, "image")) == 12


def test_new_encoder_serves_only_once_complete(active, archive, tmp_path):
    model = enc.build_encoder("resnet18", dim=16, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "next.pt", model)
    newer = services.encoder_register(path=tmp_path / "next.pt", name="next")
    services.encoder_activate(encoder=newer)  # queued: the old version keeps serving
    newer.refresh_from_db()
    assert newer.status == EncoderVersion.Status.ACTIVATING and services.active_encoder() == active
    services.finish_activation(encoder_id=newer.pk)
    newer.refresh_from_db()
    active.refresh_from_db()
    assert newer.status == EncoderVersion.Status.ACTIVE and active.status == EncoderVersion.Status.RETIRED
    assert Embedding.objects.filter(encoder=newer, kind="image").count() == 12
    results = selectors.similar_cases(instance=archive.first(), k=3)
    assert results.encoder == "next" and len(results.hits) == 3


def test_feedback_is_stored(api, active, archive, user):
    query, result = archive[0], archive[3]
    response = api.post(
        "/api/v1/search/feedback/",
        {
            "query_sop_instance_uid": query.sop_instance_uid,
            "result_sop_instance_uid": result.sop_instance_uid,
            "rank": 1,
            "score": 0.9,
            "relevant": True,
        },
        format="json",
    )
    assert response.status_code == 201
    from embeddings.models import SearchFeedback

    feedback = SearchFeedback.objects.get()
    assert feedback.user == user and feedback.relevant and feedback.encoder == active


def _file(name: str, data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_index_gpu_setting_reaches_the_index(settings, active, caplog, setting):
    """PRECEDENT_INDEX_GPU is passed to every index the service builds or loads: "on"
    asks for the GPU copy, which this faiss build cannot give, and says so; "off" never
    asks. Either way the index serves from the CPU here, with the same answers."""
    settings.PRECEDENT_INDEX_GPU = setting
    services.forget_indexes()
    with caplog.at_level("WARNING", logger="embeddings.index"):
        built = services.index_build(active, "image")
        services.serving_index(active, "image")
    warned = [r for r in caplog.records if "use_gpu requested" in r.getMessage()]
    assert len(warned) == (2 if setting == "on" else 0)
    assert built.use_gpu is False and len(built) == Embedding.objects.filter(encoder=active, kind="image").count()
