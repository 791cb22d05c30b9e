"""The embedding pipeline, the serving index and POST /api/v1/search/, on real images.

A small real encoder (ResNet-18, 64 px, random weights) is enough to test the
plumbing: what is embedded, what is searched, what filters and errors do. Retrieval
quality is measured by `evaluate_retrieval`, not here.
"""

from __future__ import annotations

import io
import threading
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


@pytest.mark.parametrize("factors", [(1,), (4, 32)])
def test_over_fetching_gives_the_filtered_search_its_exact_answer(active, archive, monkeypatch, factors):
    """A filter answered by fetching more neighbours and keeping those that pass gives
    the same hits, in the same order, as the search among the listed passing ids; one
    too selective for the rounds falls back to that search."""
    from embeddings import selectors

    query = archive.first()
    for filters, k in ((selectors.SearchFilters(modality="MG"), 5), (selectors.SearchFilters(laterality="R"), 3)):
        monkeypatch.setattr(selectors, "OVER_FETCH_FACTORS", factors)
        fetched = selectors.similar_cases(instance=query, encoder=active, k=k, filters=filters).hits
        monkeypatch.setattr(selectors, "OVER_FETCH_FACTORS", ())  # straight to the listed ids
        listed = selectors.similar_cases(instance=query, encoder=active, k=k, filters=filters).hits
        assert len(listed) == k
        assert [(h.sop_instance_uid, round(h.score, 5)) for h in fetched] == [
            (h.sop_instance_uid, round(h.score, 5)) for h in listed
        ]


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


def test_with_a_trained_encoder_not_yet_active_the_search_says_how_to_activate_it(api, archive, tiny_encoder):
    services.encoder_register(path=tiny_encoder, name="tiny")
    body = api.post("/api/v1/search/", {"sop_instance_uid": archive.first().sop_instance_uid}, format="json").json()
    assert body["status"] == "no_encoder" and "`manage.py encoder activate tiny`" in body["message"]


@pytest.mark.parametrize("damage", ["missing", "other weights"])
def test_a_query_that_needs_the_encoder_file_says_it_is_unavailable(api, active, archive, settings, damage):
    """A box query embeds a crop, so it needs the weights file; a missing or replaced
    file is an administrator's problem: 200 with a status saying which, never a 500
    and never vectors from other weights."""
    services._loaded.cache_clear()  # as a freshly started server
    path = Path(settings.PRECEDENT_HOME) / active.weights_path
    if damage == "missing":
        path.unlink()
    else:
        other = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
        enc.save_encoder(path, other)
    query = {"sop_instance_uid": archive.first().sop_instance_uid, "box": [300, 300, 500, 500]}
    response = api.post("/api/v1/search/", query, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "encoder_unavailable" and body["results"] == []
    assert active.name in body["message"] and ("cannot read" in body["message"] or "other weights" in body["message"])
    # A whole-image query by a stored instance uses its stored vector and still answers.
    plain = api.post("/api/v1/search/", {"sop_instance_uid": archive.first().sop_instance_uid}, format="json")
    assert plain.json()["status"] == "ok"


def test_upload_png_and_dicom_as_query(api, active, archive, datasets):
    png = (datasets / "mini-mias" / "images" / "mdb003.png").read_bytes()
    response = api.post("/api/v1/search/", {"file": _file("q.png", png), "k": 4}, format="multipart")
    assert response.status_code == 200 and len(response.json()["results"]) == 4
    dcm = (datasets / "dicom-test-files" / "pydicom-test_files" / "CT_small.dcm").read_bytes()
    response = api.post("/api/v1/search/", {"file": _file("q.dcm", dcm), "k": 2}, format="multipart")
    assert response.status_code == 200 and len(response.json()["results"]) == 2
    # A query identifies nothing by its UIDs: a malformed one is no reason to refuse it.
    uid = b"1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert uid in dcm
    bad = dcm.replace(uid, b"not.a-uid!" + b"x" * (len(uid) - 10))
    response = api.post("/api/v1/search/", {"file": _file("q.dcm", bad), "k": 2}, format="multipart")
    assert response.status_code == 200 and len(response.json()["results"]) == 2, response.content


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


# --- deletions, out-of-order commits and re-embedding while search serves ----------------


def _top_hit(query: Instance, k: int = 5) -> selectors.SearchResults:
    return selectors.similar_cases(instance=query, k=k)


def test_hits_deleted_before_the_index_caught_up_are_replaced(settings, active, archive):
    """A deletion in any process, before this one's next catch-up: the search still
    gives k results, ranked 1..k, none of them the deleted image."""
    settings.PRECEDENT_INDEX_SYNC_SECONDS = 3600  # this process will not catch up by itself
    query = archive.first()
    first = _top_hit(query)
    gone_uid = first.hits[0].sop_instance_uid
    Instance.objects.get(sop_instance_uid=gone_uid).delete()
    again = _top_hit(query)
    assert [h.rank for h in again.hits] == [1, 2, 3, 4, 5]
    assert gone_uid not in {h.sop_instance_uid for h in again.hits}
    assert [h.sop_instance_uid for h in again.hits[:4]] == [h.sop_instance_uid for h in first.hits[1:]]


def test_rows_committed_out_of_id_order_are_caught_up(active, archive):
    """Two transactions: the one with the higher ids commits first and is seen; the
    other commits afterwards with lower ids. Neither the newest embedding id nor the
    newest tombstone id moves, and the index must still take both in."""
    index = services.serving_index(active, "image")
    rows = list(Embedding.objects.filter(encoder=active, kind="image").order_by("pk"))
    first, late = rows[0], rows[1]
    first_pk = first.pk
    first.delete()  # tombstone X, seen by the next search
    _top_hit(archive.last())
    newest = EmbeddingTombstone.objects.order_by("-pk").first().pk
    assert first_pk not in index and not EmbeddingTombstone.objects.filter(pk=newest - 1).exists()

    # The late deletion: its row goes and its tombstone gets the lower id X-1.
    Embedding.objects.filter(pk=late.pk)._raw_delete(Embedding.objects.db)
    EmbeddingTombstone.objects.create(pk=newest - 1, embedding_id=late.pk, encoder=active, kind="image")
    # The late insert: an embedding row with an id below the newest one seen.
    newest_embedding = Embedding.objects.order_by("-pk").first().pk
    used = {first_pk, late.pk}  # ids are never reused
    free = next(
        i for i in range(newest_embedding - 1, 0, -1) if i not in used and not Embedding.objects.filter(pk=i).exists()
    )
    Embedding.objects.create(pk=free, instance=rows[2].instance, encoder=active, kind="image", frame=2,
                             vector=rows[2].vector)  # fmt: skip

    _top_hit(archive.last())  # the next catch-up
    assert late.pk not in index and free in index
    assert len(index) == Embedding.objects.filter(encoder=active, kind="image").count()


def test_embed_all_replaces_vectors_batch_by_batch(active, archive):
    """`embed --all` never leaves an image without a vector: each batch's new rows
    replace its old ones in one transaction, and every old row leaves a tombstone."""
    old = set(Embedding.objects.filter(encoder=active).values_list("pk", flat=True))
    seen = []
    # A radiologist moves a box of the last batch while the run is on: its own job
    # re-embeds it, and the run (which read the old box) must not undo that.
    moved = Finding.objects.filter(instance__in=list(archive)[10:], x0__isnull=False).first()
    assert moved is not None

    def progress(done: int, total: int) -> None:
        seen.append((done, Embedding.objects.filter(encoder=active, kind="image").count()))
        if done == 5:
            moved.x0 += 2
            moved.save()
            services.embed_findings(finding_ids=[moved.pk])  # the job the save enqueues

    report = services.embed_pending(encoder=active, batch_size=5, progress=progress, replace=True)
    assert report.images == 12 and report.regions == Finding.objects.filter(x0__isnull=False).count() - 1
    assert seen == [(5, 12), (10, 12), (12, 12)]
    assert Embedding.objects.get(finding=moved, encoder=active).box == moved.box
    new = set(Embedding.objects.filter(encoder=active).values_list("pk", flat=True))
    assert len(new) == len(old) and not new & old
    assert set(EmbeddingTombstone.objects.filter(encoder=active).values_list("embedding_id", flat=True)) == old
    index = services.serving_index(active, "image")
    rows = Embedding.objects.filter(encoder=active, kind="image").values_list("pk", flat=True)
    assert set(index.ids().tolist()) == set(rows)


def test_index_type_setting_applies_to_a_saved_index(settings, active, archive):
    services.serving_index(active, "image", save=True)  # 12 vectors: exact
    assert services.serving_index(active, "image").index_type == "flat"
    settings.PRECEDENT_INDEX_TYPE = "hnsw"
    services.forget_indexes()
    index = services.serving_index(active, "image")
    assert index.index_type == "hnsw" and len(index) == 12
    assert services.index_status(active, "image")["saved"]["index_type"] == "hnsw"  # saved as rebuilt
    settings.PRECEDENT_INDEX_TYPE = "auto"
    services.forget_indexes()
    assert services.serving_index(active, "image").index_type == "flat"  # 12 is under the threshold


def test_clearing_a_finding_box_removes_its_lesion(active, archive):
    finding = Finding.objects.filter(instance__in=archive, x0__isnull=False).first()
    region = Embedding.objects.get(finding=finding, encoder=active)
    index = services.serving_index(active, "region")
    assert region.pk in index
    finding.x0 = finding.y0 = finding.x1 = finding.y1 = None
    finding.save()
    assert not Embedding.objects.filter(finding=finding).exists()
    assert EmbeddingTombstone.objects.filter(embedding_id=region.pk, kind="region").exists()
    services.serving_index(active, "region")  # the next search's catch-up
    assert region.pk not in index


def test_deleting_an_encoder_version_takes_its_rows_and_files(active, archive, tmp_path,
                                                             django_capture_on_commit_callbacks):  # fmt: skip
    from django.conf import settings as django_settings

    model = enc.build_encoder("resnet18", dim=16, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "next.pt", model)
    newer = services.encoder_register(path=tmp_path / "next.pt", name="next")
    services.encoder_activate(encoder=newer, wait=True)  # retires "tiny"
    active.refresh_from_db()
    assert active.status == EncoderVersion.Status.RETIRED
    Embedding.objects.filter(encoder=active).first().delete()  # a tombstone of its own too
    weights = Path(django_settings.PRECEDENT_HOME) / active.weights_path
    index_folder = services.index_dir(active, "image").parent
    assert weights.is_file() and index_folder.is_dir()

    with django_capture_on_commit_callbacks(execute=True):
        active.delete()
    assert not Embedding.objects.filter(encoder_id=active.pk).exists()
    assert not EmbeddingTombstone.objects.filter(encoder_id=active.pk).exists()
    assert not weights.exists() and not index_folder.exists()
    assert Embedding.objects.filter(encoder=newer).count() > 0  # the serving version is untouched
    assert len(selectors.similar_cases(instance=archive.first(), k=3).hits) == 3


def test_the_serving_encoder_cannot_be_deleted_in_the_admin(admin_client, active):
    response = admin_client.get(f"/admin/embeddings/encoderversion/{active.pk}/delete/")
    assert response.status_code == 403
    response = admin_client.post(
        "/admin/embeddings/encoderversion/",
        {"action": "delete_selected", "_selected_action": [active.pk], "post": "yes"},
    )
    assert response.status_code == 403 and EncoderVersion.objects.filter(pk=active.pk).exists()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_oversized_picture_upload_is_400(api, active, archive, side):
    response = api.post("/api/v1/search/", {"file": _file("bomb.png", _png_header_only(side, side))},
                        format="multipart")  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"] in (
        f"the image is {side}×{side} pixels: at most 89,478,485 pixels are accepted",
        "cannot decode the upload: send a DICOM, PNG or JPEG image",
    )


def test_uploaded_dicom_leaves_out_its_own_patient(api, active, archive, make_dicom):
    from studies.services import dicom_store

    query = archive.first()
    data = dicom_store().path(query.file_path).read_bytes()
    patient = query.series.study.patient.patient_id
    body = api.post("/api/v1/search/", {"file": _file("q.dcm", data), "k": 10}, format="multipart").json()
    assert len(body["results"]) == 10 and patient not in {r["patient_id"] for r in body["results"]}
    body = api.post("/api/v1/search/", {"file": _file("q.dcm", data), "k": 1, "exclude_same_patient": "false"},
                    format="multipart").json()  # fmt: skip
    assert body["results"][0]["sop_instance_uid"] == query.sop_instance_uid
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # A query need not be storable: a DICOM without its study UID still searches.
    def without_study_uid(ds):
        del ds.StudyInstanceUID

    response = api.post("/api/v1/search/", {"file": _file("q.dcm", make_dicom(transform=without_study_uid)), "k": 2},
                        format="multipart")  # fmt: skip
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_an_image_deleted_while_its_batch_is_embedded_gets_no_vector(active, archive, tiny_encoder):
    """A PACS administrator deletes an image while `embed` works through the archive:
    the run stores the other images' vectors and leaves the deleted one out, instead of
    failing the batch on a foreign key to a row that is gone."""
    second = services.encoder_register(path=tiny_encoder, name="tiny-2")
    instances = list(archive)
    gone = next(i for i in instances[5:10] if i.findings.exclude(x0=None).exists())  # batch 2, with a box
    gone_pk = gone.pk

    def progress(done: int, total: int) -> None:
        if done == 5:  # batch 2 is being decoded (or already is) from the rows read at the start
            Instance.objects.get(pk=gone_pk).delete()

    report = services.embed_pending(encoder=second, batch_size=5, progress=progress)
    assert report.images == 11
    stored = Embedding.objects.filter(encoder=second)
    assert not stored.filter(instance_id=gone_pk).exists()
    assert set(stored.filter(kind="image").values_list("instance_id", flat=True)) == {
        i.pk for i in instances if i.pk != gone_pk
    }


def test_a_serving_process_loads_the_active_indexes_at_start(active, archive, caplog):
    services.forget_indexes()
    loaded = services.warm_indexes()
    assert [line.split(":")[0] for line in loaded] == ["tiny/image", "tiny/region"]
    assert f"tiny/image: {archive.count()} vectors" in loaded[0]
    assert (active.pk, "image") in services._served and (active.pk, "region") in services._served
    # Without an active encoder there is nothing to load, and nothing fails.
    services.forget_indexes()
    EncoderVersion.objects.filter(pk=active.pk).update(status=EncoderVersion.Status.READY)
    assert services.warm_indexes() == [] and "no active encoder" in caplog.text


def test_a_search_while_its_index_loads_says_so_instead_of_waiting(api, active, archive):
    services.forget_indexes()
    query = {"sop_instance_uid": archive.first().sop_instance_uid}
    with services._served_lock:
        loading = services._loading_locks.setdefault((active.pk, "image"), threading.Lock())
    with loading:  # as the start-up thread holds it while it loads
        body = api.post("/api/v1/search/", query, format="json").json()
        assert body["status"] == "index_loading" and body["results"] == [] and "ask again" in body["message"]
    assert api.post("/api/v1/search/", query, format="json").json()["status"] == "ok"
