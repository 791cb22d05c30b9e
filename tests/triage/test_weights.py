"""Triage weights files and model versions: round trip, damaged files, activation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from triage import classifier, services
from triage.models import TriageModelVersion
from triage.weights import ModelFileError, ModelMeta, load_model_file, save_model


def tiny_model() -> classifier.MammoClassifier:
    torch.manual_seed(0)
    return classifier.build_classifier("resnet18")


def test_save_and_load_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    model = tiny_model()
    meta = classifier.classifier_meta(model, training={"cohort": "c", "epochs": 2}, metrics={"auc": 0.7})
    digest = save_model(tmp_path / "m.pt", model, meta)
    assert len(digest) == 64
    state, loaded = load_model_file(tmp_path / "m.pt")
    assert loaded == meta
    assert loaded.classes == ("abnormal", "malignant")
    rebuilt = classifier.build_from_meta(loaded)
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 512, 384)
    assert torch.allclose(model.eval()(x), rebuilt.eval()(x))
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file is renamed, not left behind"


def test_damaged_and_foreign_files_are_refused_with_one_line(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "m.pt"
    save_model(path, model, classifier.classifier_meta(model))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] += 1.0
    torch.save(payload, tmp_path / "damaged.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("not torch")
    for name, message in [
        ("damaged.pt", "checksum mismatch"),
        ("plain.pt", "not a Precedent triage model file"),
        ("text.pt", "not a readable torch weights file"),
        ("missing.pt", "no such weights file"),
    ]:
        with pytest.raises(ModelFileError, match=message) as info:
            load_model_file(tmp_path / name)
        assert "\n" not in str(info.value)


def test_meta_refuses_an_unknown_kind() -> None:
    with pytest.raises(ModelFileError, match="unknown model kind"):
        ModelMeta(kind="oracle", architecture="x", classes=(), config={}, preprocessing={})


@pytest.mark.django_db
def test_register_activate_retires_the_previous_and_loads_once(settings) -> None:
    model = tiny_model()
    first = services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )
    assert first.status == TriageModelVersion.Status.ACTIVE
    assert (Path(settings.PRECEDENT_HOME) / first.weights_path).is_file()
    second = services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), name="second", activate=True
    )
    first.refresh_from_db()
    assert (first.status, second.status) == ("retired", "active")
    loaded = services.active_triage_model("classifier")
    assert loaded.version.pk == second.pk and not loaded.module.training
    assert services.active_triage_model("classifier") is loaded  # cached per process
    assert services.active_triage_model("detector") is None
    with pytest.raises(ValueError, match="exists already"):
        services.triage_model_register(
            kind="classifier", model=model, meta=classifier.classifier_meta(model), name="second"
        )
    assert TriageModelVersion.objects.count() == 2
    assert len(list((Path(settings.PRECEDENT_HOME) / "models" / "triage").glob("*.pt"))) == 2, "no orphan file"


@pytest.mark.django_db
def test_a_tampered_registered_file_is_refused(settings) -> None:
    model = tiny_model()
    version = services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )
    (Path(settings.PRECEDENT_HOME) / version.weights_path).write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="does not match its registered sha256"):
        services.load_triage_model(version)
