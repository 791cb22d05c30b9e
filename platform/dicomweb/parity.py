"""QIDO-RS parity with a reference archive (Orthanc 1.10 and its DICOMweb plugin).

No Django here: two DICOMweb endpoints, the same files, the same queries.

1. Each file goes to our STOW-RS in a request of its own (so each gets a verdict).
2. The files we stored go to the reference the same way; a study holding a file only
   one side stored is left out of the comparison (ingest policy is not QIDO).
3. The files we stored go to us again in one chunked request: all must come back as
   successes (duplicates), which also exercises a streamed multi-part body.
4. Every query runs against both. Answers must match: the same matches (by the query
   level's UID), and the same values for the attributes PS3.18 Table 10.6.3-3..5
   requires for that resource, the matching keys and the includefields, after taking
   out notation only: an empty attribute and an absent one, number formatting, TM
   precision, the ACR-NEMA date form yyyy.mm.dd, the order of ModalitiesInStudy, the
   host part of RetrieveURL, an absent NumberOfFrames (one frame).
5. The files we rejected go to the reference last (they cannot change the answers);
   its verdict on each is reported beside ours.

Every difference is either explained by a rule below (`_explain_value`,
`_explain_match`), each naming whose behaviour it is and why, or it is unexplained
and fails the run. The rules check the data (the files' own header values), so a
rule cannot hide a difference it does not describe.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .dicomweb import (
    ATTRIBUTES,
    DICOM,
    DICOM_JSON,
    REQUIRED,
    Level,
    OutPart,
    attribute_tag,
    multipart_body,
    multipart_content_type,
    new_boundary,
    tag_key,
)

LEVEL_UID = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID", Level.INSTANCE: "SOPInstanceUID"}
# DICOM JSON is UTF-8 whatever the file's character set, so Specific Character Set says
# nothing about the values: Orthanc echoes the file's, we leave it out. Not compared.
NOT_COMPARED = {"SpecificCharacterSet"}
# What PS3.18 Table 10.6.3-3..5 require beyond what this archive returns (it keeps no
# such values): compared all the same, so a gap shows as a difference of ours.
STANDARD_ONLY: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("TimezoneOffsetFromUTC",),
    Level.SERIES: ("TimezoneOffsetFromUTC", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
    Level.INSTANCE: ("TimezoneOffsetFromUTC",),
}
COMPUTED_COUNTS = {"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
COMPUTED_COUNTS |= {"NumberOfSeriesRelatedInstances"}
# Characters sent as they are in query strings: the wildcards, the PN and list
# separators. Orthanc 1.10 does not percent-decode QIDO-RS values (see below).
RAW_QUERY_CHARACTERS = "*?^,\\-.:"


@dataclass(frozen=True)
class Explanation:
    owner: str  # "ours" or "Orthanc"
    why: str


NO_TIMEZONE = Explanation("ours", "studies.Study keeps no TimezoneOffsetFromUTC (0008,0201)")
NO_PERFORMED_START = Explanation(
    "ours", "studies.Series keeps no Performed Procedure Step Start Date/Time (0040,0244/0245)"
)
ORTHANC_NO_AVAILABILITY = Explanation(
    "Orthanc", "PS3.18 Table 10.6.3-3..5 require InstanceAvailability (0008,0056); Orthanc leaves it out"
)
ORTHANC_NO_COUNTS = Explanation(
    "Orthanc",
    "searches across studies (or series) return the study's (series') attributes; Orthanc leaves out the "
    "computed ones (ModalitiesInStudy, NumberOfStudyRelated*, NumberOfSeriesRelatedInstances)",
)
ORTHANC_EMPTY_IN_RANGE = Explanation(
    "Orthanc", "PS3.4 C.2.2.2.5: an empty value does not match a range; Orthanc lets studies without it match"
)
ORTHANC_TM_AS_TEXT = Explanation(
    "Orthanc", "Orthanc compares TM values as text, so 1200 (12:00) falls outside 120000-153000"
)
ORTHANC_CASE_INSENSITIVE = Explanation(
    "Orthanc", "PS3.4 C.2.2.2.1 matches LO values case-sensitively; Orthanc matches PatientID in any case"
)
ORTHANC_NO_PERCENT_DECODING = Explanation(
    "Orthanc",
    "Orthanc 1.10 does not percent-decode QIDO-RS values: %2A, %5E, %2C stay literal, so clients that encode "
    "(dicomweb-client does, with quote_plus) get no wildcard, PN or list matches",
)


@dataclass(frozen=True)
class ParityQuery:
    name: str
    level: Level
    path: str = ""  # under the base URL, e.g. /studies/{uid}/series; "" for the level's root
    params: tuple[tuple[str, str], ...] = ()
    percent_encode: bool = False  # encode values as dicomweb-client does (quote_plus)

    @property
    def url_path(self) -> str:
        return self.path or {Level.STUDY: "/studies", Level.SERIES: "/series", Level.INSTANCE: "/instances"}[self.level]

    @property
    def target(self) -> str:
        safe = "" if self.percent_encode else RAW_QUERY_CHARACTERS
        query = "&".join(f"{key}={quote(value, safe=safe)}" for key, value in self.params)
        return f"{self.url_path}?{query}" if query else self.url_path

    @property
    def study_in_path(self) -> str:
        parts = self.url_path.split("/")
        return parts[2] if len(parts) > 2 and parts[1] == "studies" else ""

    def compared(self) -> list[str]:
        """Keywords whose values are compared: required at the levels this resource
        returns, matching keys and includefields."""
        levels = [self.level]
        if self.level != Level.STUDY and "/studies/" not in self.url_path:
            levels.append(Level.STUDY)
        if self.level == Level.INSTANCE and "/series/" not in self.url_path:
            levels.append(Level.SERIES)
        keywords = [k for level in levels for k in (*REQUIRED[level], *STANDARD_ONLY[level])]
        for key, value in self.params:
            for name in value.split(",") if key == "includefield" else [key]:
                tag = attribute_tag(name)
                if tag is not None:
                    keywords.append(_keyword_of(tag))
        return [k for k in dict.fromkeys(keywords) if k not in NOT_COMPARED]

    def matching(self) -> dict[str, str]:
        return {
            _keyword_of(tag): value
            for key, value in self.params
            if key != "includefield" and (tag := attribute_tag(key)) is not None
        }


def _keyword_of(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or tag_key(tag)


def default_queries(headers: Iterable[Any]) -> list[ParityQuery]:
    """The queries of a run over dicom-test-files, with UIDs from the stored files'
    headers (pydicom datasets); a file that is missing leaves its query matching nothing."""
    by_patient: dict[str, Any] = {}
    for ds in headers:
        by_patient.setdefault(str(ds.get("PatientID", "")), ds)

    def uid(patient: str, keyword: str) -> str:
        return str(by_patient[patient].get(keyword, "")) if patient in by_patient else "0.0"

    study, series, instance = Level.STUDY, Level.SERIES, Level.INSTANCE
    two_studies = f"{uid('1CT1', 'StudyInstanceUID')},{uid('4MR1', 'StudyInstanceUID')}"
    dicomdir_study = uid("98890234", "StudyInstanceUID")
    tiny_study, tiny_series = uid("12345678", "StudyInstanceUID"), uid("12345678", "SeriesInstanceUID")
    return [
        ParityQuery("all studies", study),
        ParityQuery("PatientID", study, params=(("PatientID", "4MR1"),)),
        ParityQuery("PatientID by tag", study, params=(("00100020", "98890234"),)),
        ParityQuery("PatientID is literal", study, params=(("PatientID", "4mr1"),)),
        ParityQuery("PatientName exact", study, params=(("PatientName", "Doe^Archibald"),)),
        ParityQuery("PatientName prefix", study, params=(("PatientName", "CompressedSamples*"),)),
        ParityQuery("PatientName any case", study, params=(("PatientName", "compressedsamples^mr*"),)),
        ParityQuery("PatientName suffix", study, params=(("PatientName", "*^Jan"),)),
        ParityQuery("PatientName ?", study, params=(("PatientName", "?oe^P*"),)),
        ParityQuery(
            "PatientName percent-encoded", study, params=(("PatientName", "CompressedSamples*"),), percent_encode=True
        ),
        ParityQuery("StudyDate single", study, params=(("StudyDate", "20040826"),)),
        ParityQuery("StudyDate range", study, params=(("StudyDate", "20030101-20041231"),)),
        ParityQuery("StudyDate until", study, params=(("StudyDate", "-20011231"),)),
        ParityQuery("StudyDate from", study, params=(("StudyDate", "20170101-"),)),
        ParityQuery("StudyTime range", study, params=(("StudyTime", "120000-153000"),)),
        ParityQuery("ModalitiesInStudy CT", study, params=(("ModalitiesInStudy", "CT"),)),
        ParityQuery("ModalitiesInStudy US", study, params=(("ModalitiesInStudy", "US"),)),
        ParityQuery("AccessionNumber", study, params=(("AccessionNumber", "FUJI95706"),)),
        ParityQuery("StudyInstanceUID list", study, params=(("StudyInstanceUID", two_studies),)),
        ParityQuery(
            "includefield",
            study,
            params=(("PatientID", "1CT1"), ("includefield", "StudyDescription"), ("includefield", "InstitutionName")),
        ),
        ParityQuery("all series", series),
        ParityQuery("series of a study", series, path=f"/studies/{dicomdir_study}/series"),
        ParityQuery("series by Modality", series, params=(("Modality", "MR"),)),
        ParityQuery("series by PatientID", series, params=(("PatientID", "98890234"),)),
        ParityQuery("all instances", instance),
        ParityQuery("instances of a series", instance, path=f"/studies/{tiny_study}/series/{tiny_series}/instances"),
        ParityQuery("instances of a study", instance, path=f"/studies/{dicomdir_study}/instances"),
        ParityQuery("instances by SOPClassUID", instance, params=(("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),)),
    ]


# --- normalising notation ------------------------------------------------------------------


def normalise(keyword: str, element: dict[str, Any] | None) -> Any:
    """An attribute's value with notation taken out; None when empty or absent."""
    values = [v for v in (element or {}).get("Value", []) if v not in (None, "", {})]
    if not values:
        return [1.0] if keyword == "NumberOfFrames" else None  # absent means one frame (PS3.3 C.7.6.6)
    vr = (element or {}).get("vr", "")
    if vr == "PN":
        names = [{k: str(v).rstrip("^ ") for k, v in name.items() if str(v).rstrip("^ ")} for name in values]
        return [name for name in names if name] or None
    if vr == "TM":
        return [_time(str(v)) for v in values]
    if vr == "DA":
        return [str(v).strip().replace(".", "") for v in values]  # ACR-NEMA yyyy.mm.dd
    if vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"):
        return [float(v) for v in values]
    if vr == "UR":
        return [str(v).split("/studies/", 1)[-1] for v in values]
    if keyword == "ModalitiesInStudy":
        return sorted({str(v).strip() for v in values})
    return [str(v).strip() for v in values]


def _time(text: str) -> str:
    """A TM value as hh:mm:ss.ffffff; the ACR-NEMA form hh:mm:ss too. Unreadable: as is."""
    main, _, fraction = text.strip().replace(":", "").partition(".")
    try:
        main = main.ljust(6, "0")
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        return dt.time(int(main[:2]), int(main[2:4]), int(main[4:6]), micro).isoformat()
    except ValueError:
        return text


# --- comparing -------------------------------------------------------------------------------


@dataclass
class FileFacts:
    """What the stored files say, for the rules that explain differences."""

    study_values: dict[str, dict[str, str]] = field(default_factory=dict)  # StudyInstanceUID → raw values

    @classmethod
    def from_headers(cls, headers: Iterable[Any]) -> FileFacts:
        facts = cls()
        for ds in headers:
            raw = {k: str(ds.get(k, "") or "").strip() for k in ("PatientID", "StudyTime")}
            facts.study_values.setdefault(str(ds.get("StudyInstanceUID", "")), raw)
        return facts


@dataclass
class Difference:
    query: str
    uid: str
    keyword: str
    ours: Any
    theirs: Any
    explanation: Explanation | None = None


@dataclass
class QueryOutcome:
    query: ParityQuery
    ours: set[str] = field(default_factory=set)
    theirs: set[str] = field(default_factory=set)
    differences: list[Difference] = field(default_factory=list)
    match_explanations: dict[str, Explanation | None] = field(default_factory=dict)  # UID → why
    error: str = ""
    skipped: str = ""

    @property
    def unexplained_matches(self) -> list[str]:
        return sorted(uid for uid, why in self.match_explanations.items() if why is None)


def compare(
    query: ParityQuery, ours: list[dict], theirs: list[dict], facts: FileFacts, excluded_studies: set[str]
) -> QueryOutcome:
    """Compare two answers to `query`, leaving out studies that only one side holds."""
    uid_key = tag_key(ATTRIBUTES[LEVEL_UID[query.level]].tag)
    study_key = tag_key(ATTRIBUTES["StudyInstanceUID"].tag)

    def kept(answer: list[dict]) -> dict[str, dict]:
        return {
            _first(d, uid_key): d
            for d in answer
            if (_first(d, study_key) or query.study_in_path) not in excluded_studies
        }

    mine, reference = kept(ours), kept(theirs)
    outcome = QueryOutcome(query, set(mine), set(reference))
    for uid in sorted(mine.keys() ^ reference.keys()):
        dataset = mine.get(uid) or reference[uid]
        outcome.match_explanations[uid] = _explain_match(query, uid in mine, dataset, facts, study_key)
    for uid in sorted(mine.keys() & reference.keys()):
        for keyword in query.compared():
            key = tag_key(_tag(keyword))
            a, b = normalise(keyword, mine[uid].get(key)), normalise(keyword, reference[uid].get(key))
            if a != b:
                difference = Difference(query.name, uid, keyword, a, b)
                difference.explanation = _explain_value(query, difference, mine[uid], facts)
                outcome.differences.append(difference)
    return outcome


def _explain_value(query: ParityQuery, d: Difference, ours: dict, facts: FileFacts) -> Explanation | None:
    attribute = ATTRIBUTES.get(d.keyword)
    if d.keyword == "InstanceAvailability" and d.theirs is None:
        return ORTHANC_NO_AVAILABILITY
    if d.keyword == "TimezoneOffsetFromUTC" and d.ours is None:
        return NO_TIMEZONE
    if d.keyword.startswith("PerformedProcedureStepStart") and d.ours is None:
        return NO_PERFORMED_START
    if d.keyword in COMPUTED_COUNTS and d.theirs is None and attribute and attribute.level != query.level:
        return ORTHANC_NO_COUNTS
    return None


def _explain_match(
    query: ParityQuery, in_ours: bool, dataset: dict, facts: FileFacts, study_key: str
) -> Explanation | None:
    """Why one side matched a UID the other did not, from the files' own values."""
    raw = facts.study_values.get(_first(dataset, study_key), {})
    matching = query.matching()
    if query.percent_encode and in_ours:
        return ORTHANC_NO_PERCENT_DECODING
    if not in_ours and "PatientID" in matching and raw.get("PatientID", "").lower() == matching["PatientID"].lower():
        return ORTHANC_CASE_INSENSITIVE
    for keyword, value in matching.items():
        if "-" not in value or ATTRIBUTES.get(keyword) is None:
            continue
        theirs_value = normalise(keyword, dataset.get(tag_key(ATTRIBUTES[keyword].tag)))
        if not in_ours and theirs_value is None:
            return ORTHANC_EMPTY_IN_RANGE
        if keyword == "StudyTime" and in_ours and len(raw.get("StudyTime", "").partition(".")[0]) < 6:
            return ORTHANC_TM_AS_TEXT
    return None


def _tag(keyword: str) -> int:
    if keyword in ATTRIBUTES:
        return ATTRIBUTES[keyword].tag
    tag = attribute_tag(keyword)
    assert tag is not None, keyword
    return tag


def _first(dataset: dict, key: str) -> str:
    values = dataset.get(key, {}).get("Value", [])
    return str(values[0]) if values else ""


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service: its base URL (…/dicomweb, …/dicom-web) and request headers."""

    name: str
    base: str
    headers: dict[str, str] = field(default_factory=dict)

    def search(self, query: ParityQuery) -> list[dict]:
        """The query's DICOM JSON answer. http.client sends the query string exactly
        as built (requests would percent-encode `^`, which Orthanc then cannot match)."""
        url = urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=120)
        try:
            conn.request("GET", url.path + query.target, headers={**self.headers, "Accept": DICOM_JSON})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise QueryFailed(f"HTTP {response.status} from {self.name}: {body[:200]!r}")
        return json.loads(body) if body else []

    def stow(self, session: requests.Session, files: Iterable[Path]) -> requests.Response:
        """One STOW-RS request with these files as parts, streamed (chunked) from disk."""
        boundary = new_boundary()
        parts = (OutPart(DICOM, [path.read_bytes()]) for path in files)
        headers = {**self.headers, "Content-Type": multipart_content_type(DICOM, boundary), "Accept": DICOM_JSON}
        return session.post(f"{self.base}/studies", data=multipart_body(parts, boundary), headers=headers, timeout=600)


class QueryFailed(Exception):
    pass


@dataclass
class Verdict:
    path: Path
    stored: bool
    detail: str = ""


def _verdict(path: Path, response: requests.Response) -> Verdict:
    if response.status_code == 200:
        return Verdict(path, True, "stored")
    detail = f"HTTP {response.status_code}"
    try:
        failed = response.json().get("00081198", {}).get("Value", [])
        detail += f" 0x{failed[0]['00081197']['Value'][0]:04X}"
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        pass
    warning = response.headers.get("Warning", "")
    if warning:
        detail += f" ({warning.split(': ', 1)[-1].rstrip(chr(34))[:160]})"
    return Verdict(path, False, detail)


@dataclass
class Report:
    ours: Endpoint
    reference: Endpoint
    verdicts: dict[Path, Verdict] = field(default_factory=dict)
    reference_verdicts: dict[Path, Verdict] = field(default_factory=dict)
    outcomes: list[QueryOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def unexplained(self) -> list[str]:
        """Every difference no rule explains, one line each: the run fails on these."""
        lines = list(self.problems)
        for outcome in self.outcomes:
            name = outcome.query.name
            if outcome.error:
                lines.append(f"{name}: {outcome.error}")
            for uid in outcome.unexplained_matches:
                side = "ours" if uid in outcome.ours else "theirs"
                lines.append(f"{name}: {uid} matched only in {side}")
            lines += [
                f"{name}: {d.uid} {d.keyword}: ours {json.dumps(d.ours)} vs theirs {json.dumps(d.theirs)}"
                for d in outcome.differences
                if d.explanation is None
            ]
        return lines

    def explained(self) -> dict[Explanation, int]:
        counts: dict[Explanation, int] = {}
        for outcome in self.outcomes:
            whys = [d.explanation for d in outcome.differences] + list(outcome.match_explanations.values())
            for why in whys:
                if why is not None:
                    counts[why] = counts.get(why, 0) + 1
        return counts

    def format(self, root: Path | None = None) -> str:
        def name(path: Path) -> str:
            return str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)

        stored = [v for v in self.verdicts.values() if v.stored]
        refused = [p for p, v in self.reference_verdicts.items() if self.verdicts[p].stored and not v.stored]
        lines = [
            f"DICOMweb parity: {self.ours.name} ({self.ours.base}) vs {self.reference.name} ({self.reference.base})",
            f"files: {len(self.verdicts)} sent to {self.ours.name}, {len(stored)} stored and sent to "
            f"{self.reference.name} ({len(refused)} refused there), {len(self.verdicts) - len(stored)} rejected by us",
        ]
        other = self.reference.name
        for path in refused:
            lines.append(f"  stored by us, refused by {other}: {name(path)}: {self.reference_verdicts[path].detail}")
        for path, verdict in self.verdicts.items():
            if not verdict.stored:
                theirs = self.reference_verdicts.get(path)
                lines.append(f"  rejected {name(path)}: {verdict.detail}; {other}: {theirs.detail if theirs else '-'}")
        lines += ["", f"{'query':30} {'matches (ours/theirs)':>22} {'values':>7}  result"]
        for outcome in self.outcomes:
            if outcome.skipped:
                lines.append(f"{outcome.query.name:30} {'':>22} {'':>7}  skipped: {outcome.skipped}")
                continue
            wrong = len([d for d in outcome.differences if d.explanation is None]) + len(outcome.unexplained_matches)
            known = len(outcome.differences) + len(outcome.match_explanations) - wrong
            result = f"ERROR {outcome.error}" if outcome.error else "same" if not wrong and not known else ""
            if wrong:
                result += f"{wrong} UNEXPLAINED"
            if known:
                result += f"{', ' if wrong else ''}{known} explained"
            matches = f"{len(outcome.ours)}/{len(outcome.theirs)}"
            lines.append(f"{outcome.query.name:30} {matches:>22} {len(outcome.differences):>7}  {result}")
        explained = self.explained()
        if explained:
            lines += ["", "explained differences (count, whose, why):"]
            lines += [f"  {n:4} {why.owner}: {why.why}" for why, n in sorted(explained.items(), key=lambda i: -i[1])]
        unexplained = self.unexplained()
        lines += ["", f"unexplained differences: {len(unexplained)}", *[f"  {line}" for line in unexplained[:200]]]
        return "\n".join(lines)


def run_parity(files: list[Path], ours: Endpoint, reference: Endpoint) -> Report:
    """Store `files` on both sides, run the queries, compare (see the module docstring)."""
    import pydicom

    report = Report(ours, reference)
    with requests.Session() as ours_http, requests.Session() as reference_http:
        for path in files:
            report.verdicts[path] = _verdict(path, ours.stow(ours_http, [path]))
        accepted = [path for path, verdict in report.verdicts.items() if verdict.stored]
        for path in accepted:
            report.reference_verdicts[path] = _verdict(path, reference.stow(reference_http, [path]))
        again = ours.stow(ours_http, accepted)
        if again.status_code != 200:
            report.problems.append(f"storing the same files again in one request gave HTTP {again.status_code}")
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in accepted}
        excluded = {
            str(headers[path].StudyInstanceUID) for path in accepted if not report.reference_verdicts[path].stored
        }
        facts = FileFacts.from_headers(headers[p] for p in accepted if str(headers[p].StudyInstanceUID) not in excluded)
        for query in default_queries(headers.values()):
            report.outcomes.append(_run_query(query, ours, reference, facts, excluded))
        for path in files:
            if not report.verdicts[path].stored:
                report.reference_verdicts[path] = _verdict(path, reference.stow(reference_http, [path]))
    return report


def _run_query(
    query: ParityQuery, ours: Endpoint, reference: Endpoint, facts: FileFacts, excluded: set[str]
) -> QueryOutcome:
    if query.study_in_path in excluded:
        return QueryOutcome(query, skipped="its study is held by one side only")
    try:
        answers = [ours.search(query), reference.search(query)]
    except QueryFailed as exc:
        return QueryOutcome(query, error=str(exc))
    return compare(query, *answers, facts, excluded)


def manifest_files(root: Path) -> Iterator[Path]:
    """The DICOM test files of a dicom-test-files folder, in manifest order, less the
    DICOMDIRs and gzip wrappers (media files, not instances STOW-RS carries)."""
    import csv

    with (root / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            path = root / row["path"]
            if "DICOMDIR" in path.name or path.suffix == ".gz":
                continue
            yield path
