"""QIDO-RS parity with Orthanc 1.10: the comparison rules, and the whole run.

The run (bench/dicomweb_parity.py) needs Orthanc and its DICOMweb plugin
(`apt-get install orthanc orthanc-dicomweb`) and is skipped, with the reason, without
them. It starts its own servers in a temporary folder and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomweb.dicomweb import Level
from dicomweb.parity import (
    NO_TIMEZONE,
    ORTHANC_CASE_INSENSITIVE,
    ORTHANC_EMPTY_IN_RANGE,
    ORTHANC_NO_AVAILABILITY,
    FileFacts,
    ParityQuery,
    compare,
    normalise,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "dicomweb_parity.py"
ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

STUDY = "1.2.3"


def study(**values) -> dict:
    """A study answer in DICOM JSON with the given (tag → element) values."""
    return {"0020000D": {"vr": "UI", "Value": [STUDY]}, **values}


def test_normalise_takes_out_notation_only():
    assert normalise("AccessionNumber", None) is None
    assert normalise("AccessionNumber", {"vr": "SH"}) is None
    assert normalise("AccessionNumber", {"vr": "SH", "Value": [""]}) is None
    assert normalise("StudyTime", {"vr": "TM", "Value": ["072730"]}) == normalise(
        "StudyTime", {"vr": "TM", "Value": ["072730.000"]}
    )
    assert normalise("StudyTime", {"vr": "TM", "Value": ["14:04:38"]}) == ["14:04:38"]
    assert normalise("StudyDate", {"vr": "DA", "Value": ["1997.04.24"]}) == ["19970424"]
    assert normalise("SeriesNumber", {"vr": "IS", "Value": ["3"]}) == normalise(
        "SeriesNumber", {"vr": "IS", "Value": [3]}
    )
    assert normalise("ModalitiesInStudy", {"vr": "CS", "Value": ["MR", "CT"]}) == ["CT", "MR"]
    assert normalise("PatientName", {"vr": "PN", "Value": [{"Alphabetic": "Doe^John^^"}]}) == [
        {"Alphabetic": "Doe^John"}
    ]
    assert normalise("PatientName", {"vr": "PN", "Value": [{}]}) is None
    assert normalise("RetrieveURL", {"vr": "UR", "Value": ["http://a:1/dicomweb/studies/1.2"]}) == normalise(
        "RetrieveURL", {"vr": "UR", "Value": ["http://b/dicom-web/studies/1.2"]}
    )
    assert normalise("NumberOfFrames", None) == normalise("NumberOfFrames", {"vr": "IS", "Value": [1]})
    # Real values still differ.
    assert normalise("StudyDate", {"vr": "DA", "Value": ["20240101"]}) != normalise(
        "StudyDate", {"vr": "DA", "Value": ["20240102"]}
    )


def test_query_strings_keep_wildcards_unless_told_to_encode():
    query = ParityQuery("q", Level.STUDY, params=(("PatientName", "Doe^J*"), ("StudyInstanceUID", "1.2,3.4")))
    assert query.target == "/studies?PatientName=Doe^J*&StudyInstanceUID=1.2,3.4"
    encoded = ParityQuery("q", Level.STUDY, params=(("PatientName", "Doe^J*"),), percent_encode=True)
    assert encoded.target == "/studies?PatientName=Doe%5EJ%2A"
    series = ParityQuery("q", Level.SERIES, params=(("includefield", "BodyPartExamined"),))
    assert {"Modality", "PatientID", "BodyPartExamined", "TimezoneOffsetFromUTC"} <= set(series.compared())
    scoped = ParityQuery("q", Level.SERIES, path="/studies/1.2/series")
    assert "PatientID" not in scoped.compared() and scoped.study_in_path == "1.2"


def test_differences_are_explained_only_where_a_rule_fits():
    facts = FileFacts(study_values={STUDY: {"PatientID": "P1", "StudyTime": "120000"}})
    query = ParityQuery("all studies", Level.STUDY)
    ours = study(
        **{
            "00080056": {"vr": "CS", "Value": ["ONLINE"]},
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "First^Patient"}]},
            "00080050": {"vr": "SH", "Value": ["A1"]},
        }
    )
    theirs = study(
        **{
            "00080201": {"vr": "SH", "Value": ["-0500"]},
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Other^Patient"}]},
            "00080050": {"vr": "SH", "Value": ["A2"]},
        }
    )
    outcome = compare(query, [ours], [theirs], facts, excluded_studies=set())
    why = {d.keyword: d.explanation for d in outcome.differences}
    assert why == {
        "InstanceAvailability": ORTHANC_NO_AVAILABILITY,
        "TimezoneOffsetFromUTC": NO_TIMEZONE,
        "PatientName": None,  # no rule: a real difference
        "AccessionNumber": None,
    }


def test_match_differences_are_explained_from_the_files():
    facts = FileFacts(study_values={STUDY: {"PatientID": "ABC", "StudyTime": ""}})
    by_id = ParityQuery("PatientID is literal", Level.STUDY, params=(("PatientID", "abc"),))
    theirs = [study(**{"00100020": {"vr": "LO", "Value": ["ABC"]}})]
    outcome = compare(by_id, [], theirs, facts, excluded_studies=set())
    assert outcome.match_explanations == {STUDY: ORTHANC_CASE_INSENSITIVE}
    dated = ParityQuery("StudyDate until", Level.STUDY, params=(("StudyDate", "-20011231"),))
    outcome = compare(dated, [], [study(**{"00080020": {"vr": "DA"}})], facts, excluded_studies=set())
    assert outcome.match_explanations == {STUDY: ORTHANC_EMPTY_IN_RANGE}
    other = ParityQuery("PatientID", Level.STUDY, params=(("PatientID", "XYZ"),))
    outcome = compare(other, [], theirs, facts, excluded_studies=set())
    assert outcome.unexplained_matches == [STUDY]
    assert compare(other, [], theirs, facts, excluded_studies={STUDY}).match_explanations == {}


def test_file_facts_keep_each_study_s_raw_values(dicom_files):
    headers = [
        pydicom.dcmread(dicom_files / name, stop_before_pixels=True)
        for name in (
            "pydicom-test_files/test-SR.dcm",
            "pydicom-test_files/reportsi.dcm",
            "pydicom-test_files/CT_small.dcm",
        )
    ]
    facts = FileFacts.from_headers(headers)
    assert facts.study_values[str(headers[2].StudyInstanceUID)]["PatientID"] == "1CT1"


@pytest.mark.slow
def test_parity_with_orthanc(dicom_files, tmp_path):
    """Every file of dicom-test-files to both, every query against both: no difference
    that no rule explains."""
    missing = [str(p) for p in (ORTHANC, PLUGIN) if not p.is_file()]
    if missing:
        pytest.skip(f"Orthanc 1.10 with its DICOMweb plugin is not installed ({', '.join(missing)})")
    target = tmp_path / "parity.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PRECEDENT_HOME")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", str(dicom_files), "--json", str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    report = json.loads(target.read_text())
    assert report["unexplained"] == []
    text = report["report"]
    assert "unexplained differences: 0" in text
    for query in ("all studies", "PatientName prefix", "StudyDate range", "ModalitiesInStudy CT", "all instances"):
        assert query in text
    assert "ERROR" not in text and "skipped" not in text
