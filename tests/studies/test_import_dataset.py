"""import_dataset and load_demo on the real shared datasets, through the real ingest and PostgreSQL."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from PIL import Image

from studies import dicom, services
from studies.datasets import cbis, mias, nih_cxr
from studies.datasets.base import clip_box, dataset_uid
from studies.models import Cohort, Finding, Instance, Patient, Study

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("import_dataset", *args, stdout=out)
    return out.getvalue()


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- mini-MIAS ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mias_full_import_matches_the_annotations(datasets: Path) -> None:
    """The whole set once (about 5 s): counts, patients, pairs and boxes as the CSVs say."""
    root = datasets / "mini-mias"
    output = run("mias", str(root))

    assert "224 images: 224 stored, 0 duplicate, 0 rejected" in output
    assert Instance.objects.count() == 224
    assert Patient.objects.count() == 112
    assert Study.objects.count() == 112
    assert Cohort.objects.get(name="mias").studies.count() == 112
    annotations = csv_rows(root / "annotations.csv")
    assert Finding.objects.count() == len(annotations)

    abnormal = Instance.objects.filter(findings__pathology__in=["benign", "malignant"]).distinct().count()
    normal = Instance.objects.exclude(findings__pathology__in=["benign", "malignant"]).count()
    assert (normal, abnormal) == (143, 81)

    # mdb001 and mdb002: one patient, one study, right and left MLO.
    pair = Instance.objects.filter(findings__source_key__in=["mini-mias:mdb001:0", "mini-mias:mdb002:0"])
    assert sorted(pair.values_list("laterality", flat=True)) == ["L", "R"]
    assert {i.series.study.patient.patient_id for i in pair} == {"MIAS-p001"}
    assert len({i.series.study_id for i in pair}) == 1
    first = pair.get(laterality="R")
    assert (first.view_position, first.series.modality, first.series.body_part) == ("MLO", "MG", "BREAST")
    assert (first.rows, first.columns, first.bits_stored, first.photometric_interpretation) == (
        1024,
        1024,
        8,
        "MONOCHROME2",
    )

    rows_by_image: dict[str, list[dict[str, str]]] = {}
    for row in annotations:
        rows_by_image.setdefault(row["refnum"], []).append(row)
    for refnum in ("mdb001", "mdb005", "mdb015", "mdb021"):
        for index, row in enumerate(rows_by_image[refnum]):
            finding = Finding.objects.get(source_key=f"mini-mias:{refnum}:{index}")
            assert finding.box == [float(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
            assert finding.pathology == {"B": "benign", "M": "malignant"}[row["severity"]]
            assert finding.abnormality_class == row["abnormality_class"]
            assert finding.attributes["radius"] == float(row["radius"])
            assert finding.source == "dataset"

    # Lesions the data gives no location for are findings without a box.
    diffuse = Finding.objects.get(source_key="mini-mias:mdb216:0")
    assert (diffuse.pathology, diffuse.abnormality_class, diffuse.box) == ("malignant", "CALC", None)
    assert Finding.objects.get(source_key="mini-mias:mdb003:0").pathology == "normal"

    # The stored pixels are the PNG's pixels.
    path = services.dicom_store().path(first.file_path)
    stored = dicom.decode_frame(path, dicom.read_dataset(path, stop_before_pixels=True))
    with Image.open(root / "images" / "mdb001.png") as png:
        assert np.array_equal(stored, np.asarray(png))


def test_mias_reimport_gives_duplicates_and_no_extra_findings(datasets: Path) -> None:
    first = run("mias", str(datasets / "mini-mias"), "--limit", "6", "--cohort", "mias-subset")
    findings = Finding.objects.count()
    second = run("mias", str(datasets), "--limit", "6", "--cohort", "mias-subset")  # the datasets root works too

    assert "6 images: 6 stored, 0 duplicate" in first
    assert "6 images: 0 stored, 6 duplicate, 0 rejected" in second
    assert f"findings: 0 created, {findings} updated" in second
    assert Finding.objects.count() == findings
    assert Instance.objects.count() == 6
    assert Cohort.objects.get(name="mias-subset").studies.count() == 3


def test_converted_files_are_deterministic_part10(datasets: Path) -> None:
    """Same bytes on every run (what makes a re-import a duplicate), and proper File Meta."""
    one = next(mias.read(datasets / "mini-mias", limit=1).items)
    again = next(mias.read(datasets / "mini-mias", limit=1).items)
    assert one.dicom == again.dicom
    assert one.dicom[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(one.dicom))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (ds.ConversionType, ds.ImageLaterality, ds.ViewPosition) == ("DF", "R", "MLO")
    assert (str(ds.PatientName), ds.PatientID) == ("MIAS^p001", "MIAS-p001")


def test_dataset_uids_are_stable_valid_and_distinct() -> None:
    uid = dataset_uid("mini-mias", "instance", "mdb001")
    assert uid == dataset_uid("mini-mias", "instance", "mdb001")
    assert uid != dataset_uid("mini-mias", "instance", "mdb002")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_boxes_are_clipped_to_the_image() -> None:
    assert clip_box(-10, 5, 50, 1100, 1024, 1024) == (0.0, 5.0, 50.0, 1024.0)
    assert clip_box(2000, 0, 2100, 10, 1024, 1024) is None


# --- CBIS-DDSM ---------------------------------------------------------------------------


def test_cbis_mammograms_keep_their_pixels_render_and_carry_labels(datasets: Path) -> None:
    root = datasets / "cbis-ddsm-mg-samples"
    output = run("cbis", str(root))

    assert "2 images: 2 stored" in output
    assert "not staged" in output  # six labelled files of the package are not in the folder
    for name, patient, pathology, birads in (
        ("sfm-malign-0/1-280.dcm", "P_00820", "malignant", 5),
        ("sfm-benign-0/1-130.dcm", "P_00173", "benign", 3),
    ):
        source = pydicom.dcmread(root / name)
        instance = Instance.objects.get(
            sop_instance_uid=dataset_uid(cbis.NAME, "instance", source.PatientID)  # e.g. Mass-Test_P_00173_LEFT_CC
        )
        assert instance.transfer_syntax_uid == pydicom.uid.RLELossless
        assert (instance.series.modality, instance.bits_allocated) == ("MG", 16)
        stored = pydicom.dcmread(services.dicom_store().path(instance.file_path))
        assert stored.PixelData == source.PixelData  # the RLE fragments, byte for byte
        # The header as a PACS coerces it: the woman, not the image, is the patient.
        study = instance.series.study
        assert (study.patient.patient_id, study.patient.issuer_of_patient_id) == (patient, "CBIS-DDSM")
        assert study.study_instance_uid == dataset_uid(cbis.NAME, "study", patient)
        assert (instance.laterality, instance.view_position) == ("L", "CC")
        assert source.PatientID in stored.ImageComments
        finding = instance.findings.get()
        assert (finding.pathology, finding.abnormality_class, finding.box) == (pathology, "mass", None)
        assert finding.attributes["birads"] == birads
        assert (finding.attributes["laterality"], finding.attributes["view"]) == ("L", "CC")

        png = services.instance_render_png(instance=instance, request=services.RenderRequest())
        with Image.open(png) as image:
            assert image.size == (instance.columns, instance.rows)
    assert Cohort.objects.get(name="cbis").studies.count() == 2


def test_cbis_refuses_a_broken_file_with_its_reason_and_imports_the_rest(tmp_path: Path, datasets: Path) -> None:
    """A staged file that is not DICOM (a Git LFS pointer), or is cut short, is that
    file's rejection with ingest's reason; the import goes on."""
    source = datasets / "cbis-ddsm-mg-samples"
    (tmp_path / "labels.csv").symlink_to(source / "labels.csv")
    (tmp_path / "sfm-malign-0").mkdir()
    (tmp_path / "sfm-malign-0" / "1-280.dcm").symlink_to(source / "sfm-malign-0" / "1-280.dcm")
    (tmp_path / "sfm-benign-0").mkdir()
    pointer = tmp_path / "sfm-benign-0" / "1-130.dcm"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    output = run("cbis", str(tmp_path))
    assert "2 images: 1 stored, 0 duplicate, 1 rejected" in output
    assert "not a DICOM Part 10 file" in output
    pointer.write_bytes((source / "sfm-benign-0" / "1-130.dcm").read_bytes()[:8_000_000])
    output = run("cbis", str(tmp_path))
    assert "2 images: 0 stored, 1 duplicate, 1 rejected" in output and "file is truncated" in output


def test_cbis_reports_a_staged_file_that_is_missing(tmp_path: Path, datasets: Path) -> None:
    (tmp_path / "labels.csv").write_bytes((datasets / "cbis-ddsm-mg-samples" / "labels.csv").read_bytes())
    output = run("cbis", str(tmp_path))
    assert "2 images: 0 stored, 0 duplicate, 2 rejected" in output
    assert "listed as staged in labels.csv but missing" in output
    assert cbis.NAME in output


# --- DDSM: normals with tissue maps, and Mini-DDSM benign cases ----------------------------


def test_ddsm_normals_import_one_normal_film_per_woman(datasets: Path) -> None:
    root = datasets / "ddsm-normals-tissue"
    output = run("ddsm-normals", str(root))
    rows = csv_rows(root / "labels.csv")

    assert f"{len(rows)} images: {len(rows)} stored, 0 duplicate, 0 rejected" in output
    assert "mirrored" in output  # the reader's note
    assert Patient.objects.count() == Study.objects.count() == len(rows)
    assert Cohort.objects.get(name="ddsm-normals").studies.count() == len(rows)
    assert set(Finding.objects.values_list("pathology", flat=True)) == {"normal"}

    row = rows[0]
    instance = Instance.objects.get(findings__source_key=f"ddsm-normals-tissue:{row['ddsm_image_id']}")
    assert instance.series.study.patient.patient_id == f"DDSM-{row['patient_id']}"
    assert (instance.laterality, instance.view_position, instance.series.modality) == ("R", "MLO", "MG")
    assert (instance.columns, instance.rows) == (int(row["width"]), int(row["height"]))
    finding = instance.findings.get()
    assert finding.attributes["acr_density"] == int(row["acr_density"])
    assert finding.attributes["tissue_mask"] == row["tissue_mask"] and finding.attributes["mirrored"] is True
    path = services.dicom_store().path(instance.file_path)
    stored = dicom.decode_frame(path, dicom.read_dataset(path, stop_before_pixels=True))
    with Image.open(root / row["image"]) as png:
        assert np.array_equal(stored, np.asarray(png))

    again = run("ddsm-normals", str(datasets), "--limit", "3")  # the datasets root works too
    assert "3 images: 0 stored, 3 duplicate, 0 rejected" in again


def test_mini_ddsm_keeps_the_jpeg_and_the_ddsm_outlines(datasets: Path) -> None:
    root = datasets / "mini-ddsm-benign-sample"
    output = run("mini-ddsm", str(root))
    images, lesions = csv_rows(root / "labels.csv"), csv_rows(root / "lesions.csv")
    cases = {row["patient_id"] for row in images}

    assert f"{len(images)} images: {len(images)} stored, 0 duplicate, 0 rejected" in output
    assert Patient.objects.count() == Study.objects.count() == len(cases)
    assert Cohort.objects.get(name="mini-ddsm").studies.count() == len(cases)
    # Each case is one study holding its four views as four series.
    study = Study.objects.get(patient__patient_id=f"DDSM-{images[0]['patient_id']}")
    assert sorted(study.series.values_list("instances__laterality", "instances__view_position")) == [
        ("L", "CC"),
        ("L", "MLO"),
        ("R", "CC"),
        ("R", "MLO"),
    ]
    assert study.study_date.isoformat() == "1993-03-02"  # DATE_OF_STUDY 2 3 1993: day month year

    # One finding per outline, on the image it outlines, box inclusive → exclusive.
    boxed = Finding.objects.exclude(x0=None)
    assert boxed.count() == len(lesions)
    for lesion in lesions:
        image = next(row for row in images if row["image"] == lesion["image"])
        finding = Finding.objects.get(source_key=f"mini-ddsm-benign:{image['ddsm_image_id']}:{lesion['abnormality']}")
        x0, y0, x1, y1 = (float(lesion[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        assert finding.box == [x0, y0, x1 + 1, y1 + 1]
        assert (finding.pathology, finding.abnormality_class) == ("benign", lesion["lesion_type"])
        assert finding.attributes["birads"] == int(lesion["assessment"])
    normal = [row for row in images if row["label"] == "normal"]
    assert Finding.objects.filter(pathology="normal").count() == len(normal)

    # The Mini-DDSM JPEG is stored as it came (JPEG Baseline, encapsulated), decodes to
    # the same pixels as the JPEG itself, and renders.
    row = images[0]
    instance = Instance.objects.get(
        sop_instance_uid__in=Finding.objects.filter(
            source_key__startswith=f"mini-ddsm-benign:{row['ddsm_image_id']}"
        ).values("instance__sop_instance_uid")
    )
    assert instance.transfer_syntax_uid == pydicom.uid.JPEGBaseline8Bit
    jpeg = (root / row["image"]).read_bytes()
    path = services.dicom_store().path(instance.file_path)
    stored = pydicom.dcmread(path)
    assert stored.LossyImageCompression == "01"
    assert next(pydicom.encaps.generate_frames(stored.PixelData, number_of_frames=1)).rstrip(b"\0") == jpeg.rstrip(
        b"\0"
    )
    with Image.open(root / row["image"]) as source:
        expected = np.asarray(source).astype(int)
    assert np.abs(stored.pixel_array.astype(int) - expected).max() <= 1  # libjpeg vs Pillow's IDCT
    png = services.instance_render_png(instance=instance, request=services.RenderRequest())
    with Image.open(png) as image:
        assert image.size == (int(row["width"]), int(row["height"]))
    assert [float(v) for v in stored.PixelSpacing] == [0.1, 0.1]  # 50 µm scan, halved


def test_mini_ddsm_image_labelled_benign_without_an_outline_is_benign_without_a_box(
    tmp_path: Path, datasets: Path
) -> None:
    """Only the columns the reader needs, and a lesion image whose outline is missing:
    the image keeps its label (benign, location unknown) instead of passing as normal."""
    source = datasets / "mini-ddsm-benign-sample"
    row = next(r for r in csv_rows(source / "labels.csv") if r["label"] == "benign")
    (tmp_path / "images").symlink_to(source / "images")  # read in place, nothing copied
    needed = ("image", "patient_id", "ddsm_image_id", "laterality", "view", "label")
    (tmp_path / "labels.csv").write_text(",".join(needed) + "\n" + ",".join(row[c] for c in needed) + "\n")
    (tmp_path / "lesions.csv").write_text((source / "lesions.csv").read_text().splitlines()[0] + "\n")

    assert "1 images: 1 stored" in run("mini-ddsm", str(tmp_path))
    finding = Finding.objects.get()
    assert (finding.pathology, finding.box) == ("benign", None)


def test_mini_ddsm_rejects_an_image_that_is_not_a_greyscale_jpeg(tmp_path: Path, datasets: Path) -> None:
    """A colour JPEG (or anything but an 8-bit greyscale baseline JPEG) is rejected with
    its reason, and nothing is stored for it."""
    source = datasets / "mini-ddsm-benign-sample"
    rows = csv_rows(source / "labels.csv")[:1]
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 96), (200, 10, 10)).save(tmp_path / "images" / "colour.jpg")
    rows[0]["image"] = "images/colour.jpg"
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "lesions.csv").write_text((source / "lesions.csv").read_text().splitlines()[0] + "\n")

    output = run("mini-ddsm", str(tmp_path))
    assert "1 images: 0 stored, 0 duplicate, 1 rejected" in output
    assert "expected an 8-bit greyscale baseline JPEG" in output
    assert (Instance.objects.count(), Finding.objects.count()) == (0, 0)


# --- NIH ChestX-ray14 --------------------------------------------------------------------


@pytest.mark.slow
def test_nih_import_has_pixel_boxes_visits_and_labels(datasets: Path) -> None:
    root = datasets / "nih-chestxray14-bbox"
    output = run("nih-cxr", str(root))

    assert "83 images: 83 stored" in output
    boxes = csv_rows(root / "boxes.csv")
    assert Finding.objects.exclude(x0=None).count() == len(boxes) == 96
    assert Patient.objects.count() == 78
    assert Study.objects.count() == 83  # one study per visit

    row = boxes[0]
    finding = Finding.objects.get(source_key=f"{nih_cxr.NAME}:{row['image']}:box0")
    x, y, w, h = (float(row[c]) for c in ("x", "y", "w", "h"))
    assert finding.box == pytest.approx([x, y, x + w, y + h])
    assert (finding.pathology, finding.abnormality_class) == ("unknown", row["finding"])

    # 00000032_037: a boxed "Infiltrate" (NIH's label spelling "Infiltration") plus two labels without boxes.
    instance = Instance.objects.get(series__study__accession_number="00000032_037")
    classes = sorted(instance.findings.values_list("abnormality_class", "x0"), key=lambda c: c[0])
    assert [c for c, _ in classes] == ["Cardiomegaly", "Edema", "Infiltration"]
    assert [x0 is None for _, x0 in classes] == [True, True, False]
    assert (instance.view_position, instance.series.modality, instance.series.body_part) == ("AP", "DX", "CHEST")
    assert instance.series.study.patient.sex == "F"

    negative = Instance.objects.get(series__study__accession_number="00003659_015")
    assert list(negative.findings.values_list("pathology", flat=True)) == ["normal"]
    assert negative.view_position == "PA"

    visits = Study.objects.filter(patient__patient_id="NIH-00001836").order_by("study_date")
    assert list(visits.values_list("study_id", flat=True)) == ["41", "82"]


# --- command errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("mias", "/nonexistent/mias"), "is not a folder"),
        (("mias",), "needs the PATH"),
        (("synthetic", "/tmp"), "takes no PATH"),
        (("mias", "/tmp", "--seed", "3"), "synthetic only"),
        (("synthetic", "--cohort", "no spaces please"), "--cohort"),
    ],
)
def test_bad_invocations_are_one_line_command_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message) as error:
        run(*args)
    assert "\n" not in str(error.value)


def test_missing_csv_is_a_command_error(tmp_path: Path) -> None:
    (tmp_path / "images.csv").write_text("refnum,file,patient_id,laterality\n")
    with pytest.raises(CommandError, match="annotations.csv not found"):
        run("mias", str(tmp_path))
    (tmp_path / "annotations.csv").write_text("refnum\n")
    with pytest.raises(CommandError, match="lacks column"):
        run("mias", str(tmp_path))


# --- load_demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_load_demo_twice_is_idempotent_and_creates_the_demo_login(
    tmp_path: Path, datasets: Path, precedent_home: Path
) -> None:
    """pydicom's test files plus the CBIS samples (a symlink: nothing is copied)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / cbis.FOLDER).symlink_to(datasets / cbis.FOLDER)

    first, second = io.StringIO(), io.StringIO()
    call_command("load_demo", "--data", str(data), "--no-encoder", stdout=first)
    instances = Instance.objects.count()
    findings = Finding.objects.count()
    call_command("load_demo", "--data", str(data), "--no-encoder", stdout=second)

    password = (precedent_home / "demo-login.txt").read_text().splitlines()[1]
    user = get_user_model().objects.get(username="demo")
    assert user.is_superuser and user.is_staff and user.check_password(password)
    for output in (first.getvalue(), second.getvalue()):
        assert f"Log in at http://127.0.0.1:8000 as demo / {password}" in output
    assert "pydicom test files:" in first.getvalue()
    # The mammograms arrived first, so the worklist (oldest first) opens on them.
    oldest = Study.objects.order_by("created_at", "pk").first()
    assert oldest.cohorts.filter(name="cbis").exists()
    assert " 0 stored" in second.getvalue() and "rejected" in second.getvalue()
    assert "2 images: 0 stored, 2 duplicate, 0 rejected" in second.getvalue()
    assert (Instance.objects.count(), Finding.objects.count()) == (instances, findings)
    assert Cohort.objects.get(name="cbis").studies.count() == 2
    assert get_user_model().objects.filter(username="demo").count() == 1


def test_load_demo_rejects_a_data_folder_without_datasets(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="holds none of"):
        call_command("load_demo", "--data", str(tmp_path), stdout=io.StringIO())


@pytest.mark.slow
def test_load_demo_without_datasets_generates_the_synthetic_cohort(settings, tmp_path: Path) -> None:
    """A checkout with no ../shared/datasets beside it still gets mammograms with truth, a
    demo encoder for similar-case search and a demo classifier for the worklist."""
    settings.REPO_ROOT = tmp_path / "elsewhere" / "repo"
    out = io.StringIO()
    call_command("load_demo", stdout=out)

    assert "no real datasets found" in out.getvalue()
    assert "synthetic: 100 images: 100 stored" in out.getvalue()
    cohort = Cohort.objects.get(name="synthetic-screening")
    assert cohort.studies.count() == 25
    assert all(study.patient.is_synthetic for study in cohort.studies.select_related("patient"))
    assert not Cohort.objects.filter(name__in=["mias", "cbis", "nih-cxr"]).exists()
    # ... and a quickly trained encoder, so that similar-case search works in the demo.
    from embeddings.models import Embedding, EncoderVersion

    encoder = EncoderVersion.objects.get(name="demo-resnet18")
    assert encoder.status == "active" and encoder.metadata["cohort"] == "synthetic-screening"
    assert Embedding.objects.filter(encoder=encoder, kind="image").count() >= 100
    assert "demo-resnet18 serves similar-case search" in out.getvalue()
    # ... and a quickly trained classifier, signed off on other patients, that sorts the worklist.
    from triage.models import OperatingPoint, TriageModelVersion, TriageResult

    classifier = TriageModelVersion.objects.get(name="demo-classifier")
    assert classifier.status == "active" and classifier.kind == "classifier"
    point = OperatingPoint.objects.get(model_versions=classifier)
    assert point.signed_off_by.username == "demo"
    assert point.validation_cohort.name == "synthetic-screening-triage-validation"
    train = set(Cohort.objects.get(name="synthetic-screening-triage-train").studies.values_list("patient", flat=True))
    assert train and train.isdisjoint(point.validation_cohort.studies.values_list("patient", flat=True))
    categories = set(
        TriageResult.objects.filter(study__cohorts=cohort, is_current=True).values_list("category", flat=True)
    )
    assert categories and "pending" not in categories and categories <= {"likely_negative", "routine", "suspicious"}
    assert "demo-classifier triages the worklist" in out.getvalue()
