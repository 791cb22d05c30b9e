"""train_encoder, encoder, embed and evaluate_retrieval on real MIAS films."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from embeddings.models import Embedding, EncoderVersion
from studies.datasets import mias
from studies.datasets.importer import import_conversion

pytestmark = pytest.mark.django_db


@pytest.fixture
def cohort(datasets: Path) -> str:
    import_conversion(mias.read(datasets / "mini-mias", limit=16), cohort="mias-16", progress=False)
    return "mias-16"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO(), verbosity=0)
    return out.getvalue()


@pytest.mark.slow
def test_train_activate_embed_evaluate(cohort):
    out = run(
        "train_encoder", "--cohort", cohort, "--epochs", "1", "--input-size", "64", "--dim", "32",
        "--batch-size", "8", "--name", "t1",
    )  # fmt: skip
    assert "trained t1 on 16 images of 'mias-16'" in out
    version = EncoderVersion.objects.get(name="t1")
    assert version.status == "ready" and version.metadata["cohort"] == cohort
    assert len(version.metadata["loss_history"]) == 1

    assert "t1: serving search" in run("encoder", "activate", "t1", "--wait")
    version.refresh_from_db()
    assert version.status == "active"
    assert Embedding.objects.filter(encoder=version, kind="image").count() == 16

    assert "0 images and 0 regions embedded" in run("embed", "--pending")
    _change_of_mind(version)
    figures = json.loads(
        run("evaluate_retrieval", "--cohort", cohort, "--label", "abnormal", "--k", "1", "5", "--json")
    )
    assert figures["feedback"]["count"] == 1 and figures["feedback"]["relevant_share"] == 1.0
    assert set(figures) >= {"precision_at", "map", "recall_at_10_vs_exact", "baseline", "chance"}
    chance = figures["chance"]["precision_at"]["5"]
    assert figures["chance"]["seeds"] == 50 and 0 < chance["low"] <= chance["mean"] <= chance["high"] < 1
    assert set(figures["precision_at"]) == {"1", "5"}
    assert 0 <= figures["precision_at"]["5"] <= 1 and 0 <= figures["map"] <= 1
    assert figures["recall_at_10_vs_exact"] == pytest.approx(1.0)  # a small index is exact
    assert figures["images"] == 16 and figures["patients"] == 8
    # Trained on this very cohort: every patient is one the encoder saw, and it says so.
    assert (figures["training_patients"], figures["encoder_training_cohort"]) == (8, cohort)
    table = run("evaluate_retrieval", "--cohort", cohort, "--label", "abnormality_class")
    assert "raw-pixels baseline" in table and "P@5" in table and "chance: random vectors (50 draws)" in table
    assert "warning: 8 of these 8 patients are in t1's training cohort 'mias-16'" in table

    # Similar lesions: every finding box queries the lesion index (the CSV's 8 boxes
    # of these 16 films: 7 circumscribed masses and 1 ill-defined, all benign).
    regions = json.loads(
        run("evaluate_retrieval", "--cohort", cohort, "--level", "region", "--label", "abnormality_class", "--json")
    )
    assert regions["level"] == "region" and regions["images"] == 8
    assert regions["label_counts"] == {"CIRC": 7, "MISC": 1}
    assert regions["recall_at_10_vs_exact"] == pytest.approx(1.0)
    assert 0 <= regions["precision_at"]["1"] <= 1 and "baseline" in regions
    assert "8 labelled finding boxes (lesion index)" in run(
        "evaluate_retrieval", "--cohort", cohort, "--level", "region", "--label", "pathology"
    )
    with pytest.raises(CommandError, match="--level region needs --label pathology or abnormality_class"):
        run("evaluate_retrieval", "--cohort", cohort, "--level", "region")


def _change_of_mind(version: EncoderVersion) -> None:
    """One radiologist marks a result not relevant, then relevant: one verdict counts."""
    from django.contrib.auth import get_user_model

    from embeddings.models import SearchFeedback
    from studies.models import Instance

    user = get_user_model().objects.create_user("reader2")
    query, result = Instance.objects.order_by("pk")[:2]
    for relevant in (False, True):
        SearchFeedback.objects.create(
            user=user, encoder=version, query_instance=query, result_instance=result, rank=1, score=0.5,
            relevant=relevant,
        )  # fmt: skip


def test_a_taken_name_is_refused_before_training_and_its_file_is_left_alone(cohort, settings):
    version = EncoderVersion.objects.create(
        name="taken", architecture="resnet18", dim=16, input_size=64, weights_path="models/taken.pt",
        weights_sha256="0" * 64,
    )  # fmt: skip
    served = Path(settings.PRECEDENT_HOME) / version.weights_path
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_bytes(b"the weights being served")
    with pytest.raises(CommandError, match="an encoder named 'taken' exists already"):
        run(
            "train_encoder", "--cohort", cohort, "--epochs", "1", "--input-size", "32", "--dim", "16", "--name", "taken"
        )
    assert served.read_bytes() == b"the weights being served"
    assert not list(served.parent.glob(".incoming-*"))


def test_register_rejects_other_files(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CommandError):
        run("encoder", "register", str(bogus))
    with pytest.raises(CommandError, match="no such file"):
        run("encoder", "register", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train_encoder", "--cohort", "nope"], "no cohort named 'nope'"),
        (["evaluate_retrieval", "--cohort", "nope"], "no cohort named 'nope'"),
        (["embed", "--pending"], "no active encoder"),
        (["encoder", "activate", "nope"], "no encoder version named 'nope'"),
        (["encoder", "index"], "no encoder is active"),
        (["encoder", "index", "nope"], "no encoder version named 'nope'"),
    ],
)
def test_one_line_errors(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_evaluate_without_encoder(cohort):
    with pytest.raises(CommandError, match="no active encoder"):
        run("evaluate_retrieval", "--cohort", cohort)


@pytest.mark.slow
def test_train_from_user_provided_torchvision_weights(cohort, tmp_path):
    import torch
    import torchvision

    checkpoint = tmp_path / "resnet18-imagenet.pth"  # as a site would copy one in
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), checkpoint)
    out = run(
        "train_encoder", "--cohort", cohort, "--epochs", "1", "--input-size", "64", "--dim", "16",
        "--batch-size", "8", "--name", "from-weights", "--weights", str(checkpoint),
    )  # fmt: skip
    assert "backbone from" in out and "adapted to one channel" in out
    assert EncoderVersion.objects.get(name="from-weights").metadata["init_weights"] == str(checkpoint)
    with pytest.raises(CommandError, match="is not a file"):
        run("train_encoder", "--cohort", cohort, "--weights", str(tmp_path / "missing.pth"))


def test_encoder_index_reports_database_files_and_serving_index(cohort, tmp_path, settings):
    """`encoder index`: what PostgreSQL holds, whether the saved files match it (read
    before loading), and what this process serves and where it searches."""
    from embeddings import encoder as enc
    from embeddings import services

    enc.save_encoder(tmp_path / "tiny.pt", enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(64)))
    run("encoder", "register", str(tmp_path / "tiny.pt"), "--name", "tiny")
    run("encoder", "activate", "tiny", "--wait")
    version = EncoderVersion.objects.get(name="tiny")
    counts = {kind: Embedding.objects.filter(encoder=version, kind=kind).count() for kind in ("image", "region")}
    assert counts == {"image": 16, "region": 8}  # the 8 boxes of these 16 films

    report = json.loads(run("encoder", "index", "--json"))
    assert report["encoder"] == "tiny" and report["status"] == "active"
    for row in report["indexes"]:
        assert row["embeddings"] == counts[row["kind"]]
        assert row["saved"]["count"] == counts[row["kind"]] and row["saved"]["matches_database"] is True
        serving = row["serving"]
        assert serving["count"] == counts[row["kind"]] and serving["index_type"] == "flat"
        assert serving["searches_on"] == "cpu" and serving["faiss_sees_gpu"] is False
    text = run("encoder", "index", "tiny")
    assert "image  16 embeddings in PostgreSQL" in text and "matches PostgreSQL" in text
    assert "searches on the CPU (faiss sees no GPU) (PRECEDENT_INDEX_GPU=auto)" in text

    # A process starting after the files went stale: the files say so, the index it
    # serves has caught up with PostgreSQL.
    services.forget_indexes()
    Embedding.objects.filter(encoder=version, kind="image").order_by("pk").first().delete()
    settings.PRECEDENT_INDEX_GPU = "off"
    image = json.loads(run("encoder", "index", "--json"))["indexes"][0]
    assert image["embeddings"] == 15 and image["saved"]["matches_database"] is False
    assert image["serving"]["count"] == 15 and image["serving"]["gpu_setting"] == "off"
    assert "(faiss sees no GPU)" not in run("encoder", "index")

    # A damaged index file under a manifest that still matches: said, and rebuilt.
    services.forget_indexes()
    (services.index_dir(version, "region") / "index.faiss").write_bytes(b"damaged")
    region = json.loads(run("encoder", "index", "--json"))["indexes"][1]
    assert region["saved"]["file_intact"] is False and region["saved"]["matches_database"] is False
    assert region["serving"]["count"] == counts["region"]
    services.forget_indexes()
    (services.index_dir(version, "region") / "index.faiss").write_bytes(b"damaged")
    assert "index file damaged or missing: rebuilt on load" in run("encoder", "index")


def test_bench_search_runs_and_leaves_nothing(tmp_path):
    """The benchmark as the README gives it (small, without pgvector: DATABASE_URL may
    name a server without the extension): the service and API rows come back with their
    recall, and the run's encoder, embeddings, fillers and user are gone afterwards."""
    from django.contrib.auth import get_user_model

    from studies.models import Patient

    target = tmp_path / "search.json"
    out = run("bench_search", "--n", "1000", "--dim", "16", "--queries", "20", "--single", "10", "--no-pgvector",
              "--json", str(target))  # fmt: skip
    figures = json.loads(target.read_text())
    rows = {row["setting"]: row for row in figures["extra_rows"]}
    assert set(rows) == {"similar_cases()", "similar_cases(modality=CT)", "POST /api/v1/search/"}
    # The filtered search (every row passes) finds what the unfiltered one does.
    assert all(row["recall"] == pytest.approx(1.0) for row in rows.values())
    rows["api"] = rows["POST /api/v1/search/"]
    assert rows["api"]["p50_ms"] > 0 and "POST /api/v1/search/" in out
    assert not EncoderVersion.objects.exists() and not Embedding.objects.exists()
    assert not Patient.objects.filter(patient_id__startswith="PRECEDENT-BENCH-").exists()
    assert not get_user_model().objects.filter(username="bench-search").exists()
