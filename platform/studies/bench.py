"""Pure helpers for `manage.py bench_ingest` (no Django).

The ingest benchmark compares our store-and-index path with Orthanc's on the same
bytes, so everything that must be identical for both sides lives here: the synthetic
instances, the HTTP client loop that times one request per file, the statistics, and
the child-process handling for the servers under test (gunicorn and Orthanc).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import pstats
import signal
import socket
import subprocess
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

MB = 1_000_000  # MB/s are decimal megabytes, as disk and network figures are quoted.
BENCH_PATIENT_PREFIX = "PRECEDENT-BENCH-"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


# --- synthetic instances --------------------------------------------------------------


@dataclass(frozen=True)
class ImageKind:
    """One kind of instance to benchmark: size and hierarchy shape of a typical study."""

    name: str
    sop_class_uid: str
    modality: str
    rows: int
    columns: int
    bits_stored: int
    per_series: int  # instances per series
    series_per_study: int
    default_n: int
    description: str


KINDS: dict[str, ImageKind] = {
    "ct": ImageKind(
        name="ct",
        sop_class_uid=CT_IMAGE_STORAGE,
        modality="CT",
        rows=512,
        columns=512,
        bits_stored=12,
        per_series=50,
        series_per_study=2,
        default_n=200,
        description="CT Image Storage 512×512×16 bit (≈0.5 MB)",
    ),
    "dx": ImageKind(
        name="dx",
        sop_class_uid=DX_FOR_PRESENTATION,
        modality="DX",
        rows=2500,
        columns=2048,
        bits_stored=14,
        per_series=1,
        series_per_study=2,
        default_n=30,
        description="Digital X-Ray For Presentation 2500×2048×16 bit (≈10 MB)",
    ),
}


@dataclass(frozen=True)
class BenchFile:
    """One Part 10 file held in memory, so that reading it never enters the timing;
    or, made by `batches`, one multipart request body carrying `count` files."""

    name: str
    data: bytes
    sop_instance_uid: str
    count: int = 1  # instances this request stores
    dicom_bytes: int | None = None  # of DICOM files, when `data` is more than one file

    @property
    def size(self) -> int:
        return len(self.data) if self.dicom_bytes is None else self.dicom_bytes


def run_tag() -> str:
    """Short random tag that marks one run's patients, so cleanup finds exactly them."""
    return uuid.uuid4().hex[:10]


def make_instances(kind: ImageKind, n: int, *, tag: str, label: str) -> list[BenchFile]:
    """`n` instances of `kind` with fresh UIDs, grouped into studies and series.

    Every instance, series and study gets a new UID (pydicom `generate_uid`), so each
    file exercises the whole hierarchy upsert; patients are identified as
    PRECEDENT-BENCH-<tag>-..., which is how the benchmark finds its rows again.
    """
    rng = np.random.default_rng(zlib.crc32(f"{tag}-{label}-{kind.name}".encode()))
    base = _phantom(kind, rng)
    files: list[BenchFile] = []
    study = series = None
    patient_no = 0
    per_study = kind.per_series * kind.series_per_study
    for i in range(n):
        if i % per_study == 0:
            patient_no += 1
            study = _study_attrs(kind, tag=tag, label=label, patient_no=patient_no)
        if i % kind.per_series == 0:
            series_no = (i % per_study) // kind.per_series + 1
            series = _series_attrs(kind, series_no)
        assert study is not None and series is not None
        number = i % kind.per_series + 1
        pixels = _vary(kind, base, number)
        ds = _instance(kind, study, series, number, pixels)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(
            BenchFile(
                name=f"{label}-{kind.name}-{i:05d}.dcm", data=buffer.getvalue(), sop_instance_uid=ds.SOPInstanceUID
            )
        )
    return files


def _phantom(kind: ImageKind, rng: np.random.Generator) -> np.ndarray:
    """A body-shaped image with noise: realistic bytes (no runs of zeros), made once."""
    rows, cols = kind.rows, kind.columns
    y, x = np.ogrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    if kind.modality == "CT":
        # Stored values with RescaleIntercept -1024: air 0, soft tissue ≈1064, bone ≈1800.
        body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
        lungs = ((np.abs(x) - 0.38) / 0.25) ** 2 + (y / 0.45) ** 2 <= 1
        image = np.where(body, 1064.0, 24.0)
        image = np.where(body & lungs, 224.0, image)
        image += rng.normal(0, 12, size=(rows, cols))
    else:
        # A chest film: bright mediastinum and periphery, darker lungs, 14-bit range.
        lungs = ((np.abs(x) - 0.42) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 <= 1
        image = np.full((rows, cols), 9000.0)
        image = np.where(lungs, 4000.0, image) + 1500 * y
        image += rng.normal(0, 60, size=(rows, cols))
    top = 2**kind.bits_stored - 1
    return np.clip(image, 0, top).astype(np.uint16)


def _vary(kind: ImageKind, base: np.ndarray, number: int) -> np.ndarray:
    """Slices of one CT series differ (the phantom shifts); films reuse the base image."""
    if kind.modality == "CT":
        return np.roll(base, number, axis=0)
    return base


def _study_attrs(kind: ImageKind, *, tag: str, label: str, patient_no: int) -> dict[str, Any]:
    now = dt.datetime.now()
    return {
        "PatientID": f"{BENCH_PATIENT_PREFIX}{tag}-{label}-{kind.name}-{patient_no:03d}",
        "PatientName": f"SYNTHETIC^BENCH{kind.modality}^{patient_no:03d}",
        "PatientSex": "O",
        "PatientBirthDate": "19700101",
        "StudyInstanceUID": generate_uid(),
        "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"),
        "AccessionNumber": f"B{tag[:6]}{patient_no:04d}",
        "StudyID": str(patient_no),
        "StudyDescription": "CT CHEST W/O CONTRAST" if kind.modality == "CT" else "XR CHEST 2 VIEWS",
        "ReferringPhysicianName": "REFERRER^BENCH",
        "InstitutionName": "Precedent benchmark",
    }


def _series_attrs(kind: ImageKind, series_no: int) -> dict[str, Any]:
    if kind.modality == "CT":
        description = ["Axial 1.0 mm", "Axial 5.0 mm"][(series_no - 1) % 2]
    else:
        description = ["PA", "LAT"][(series_no - 1) % 2]
    return {
        "SeriesInstanceUID": generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
        "SeriesNumber": series_no,
        "SeriesDescription": description,
        "Modality": kind.modality,
        "BodyPartExamined": "CHEST",
        "Manufacturer": "Precedent",
        "ManufacturerModelName": "Synthetic",
    }


def _instance(
    kind: ImageKind, study: dict[str, Any], series: dict[str, Any], number: int, pixels: np.ndarray
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = kind.sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceNumber = number
    for keyword, value in {**study, **series}.items():
        if keyword != "FrameOfReferenceUID":  # CT only (below)
            setattr(ds, keyword, value)
    ds.ContentDate = study["StudyDate"]
    ds.ContentTime = study["StudyTime"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = kind.rows, kind.columns
    ds.BitsAllocated = 16
    ds.BitsStored = kind.bits_stored
    ds.HighBit = kind.bits_stored - 1
    ds.PixelRepresentation = 0
    if kind.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = series["FrameOfReferenceUID"]
        ds.ImagePositionPatient = [-175.0, -175.0, -1.0 * number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -1.0 * number
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.683594, 0.683594]
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ViewPosition = series["SeriesDescription"]
        ds.PatientOrientation = ["P", "F"] if ds.ViewPosition == "PA" else ["A", "F"]
        ds.ImagerPixelSpacing = [0.143, 0.143]
        ds.KVP = 110
        ds.WindowCenter = 8192
        ds.WindowWidth = 16384
    ds.PixelData = pixels.tobytes()
    return ds


# --- timing ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0.0 for no values."""
    return float(np.percentile(values, q)) if len(values) else 0.0


@dataclass
class Figures:
    """What one (image kind × path × clients) configuration measured."""

    kind: str
    path: str
    clients: int
    instances: int = 0
    errors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    first_error: str = ""
    round_rates: list[float] = field(default_factory=list)  # instances/s of every round, when there were several

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "clients": self.clients,
            "instances": self.instances,
            "errors": self.errors,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "instances_per_s": round(self.instances_per_s, 2),
            "mb_per_s": round(self.mb_per_s, 2),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "first_error": self.first_error,
            "round_instances_per_s": [round(r, 2) for r in self.round_rates],
        }


def median_round(rounds: Sequence[Figures]) -> Figures:
    """The round with the median rate (the lower middle one of an even count), with
    every round's rate attached: on a shared machine one set can land in a busy spell,
    and interleaved rounds with the median kept report what the path does, not the
    neighbours. A round with errors is kept in preference, so errors are never hidden."""
    failed = [f for f in rounds if f.errors]
    if failed:
        chosen = failed[0]
    else:
        ordered = sorted(rounds, key=lambda f: f.instances_per_s)
        chosen = ordered[(len(ordered) - 1) // 2]
    chosen.round_rates = [f.instances_per_s for f in rounds]
    return chosen


class Worker(Protocol):
    """Stores one file; returns None when stored, else a one-line reason. Per thread."""

    def __call__(self, file: BenchFile) -> str | None: ...

    def close(self) -> None: ...


def run_timed(
    files: Sequence[BenchFile],
    make_worker: Callable[[], Worker],
    *,
    clients: int,
    figures: Figures,
    progress: Callable[[int], object] | None = None,
) -> Figures:
    """Send every file once through `clients` workers pulling from one shared list.

    The clock covers the first request to the last answer; each request is timed
    alone for the percentiles. With one client the work runs in the calling thread,
    which keeps Django's per-thread database connection the one the caller set up.
    """
    lock = threading.Lock()
    queue = iter(files)

    def next_file() -> BenchFile | None:
        with lock:
            return next(queue, None)

    def loop(worker: Worker) -> None:
        try:
            while (file := next_file()) is not None:
                t0 = time.perf_counter()
                error = worker(file)
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    if error is None:
                        figures.instances += file.count
                        figures.bytes += file.size
                        figures.latencies_ms.append(elapsed)
                    else:
                        figures.errors += 1
                        figures.first_error = figures.first_error or f"{file.name}: {error}"
                if progress is not None:
                    progress(1)
        finally:
            worker.close()

    workers = [make_worker() for _ in range(clients)]
    start = time.perf_counter()
    if clients == 1:
        loop(workers[0])
    else:
        threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    figures.seconds = time.perf_counter() - start
    return figures


# --- HTTP -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpUpload:
    """How one file goes over HTTP: the body is sent as parts, so no 10 MB copy is made."""

    path: str
    headers: dict[str, str]
    expect: frozenset[int]

    def parts(self, file: BenchFile) -> list[bytes]:
        return [file.data]


@dataclass(frozen=True)
class MultipartUpload(HttpUpload):
    """POST /api/v1/instances/: one multipart field `file` per request."""

    boundary: str = "precedent-bench-boundary-7d1f0c"

    @staticmethod
    def field_head(boundary: str, name: str) -> bytes:
        return (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()

    def parts(self, file: BenchFile) -> list[bytes]:
        return [self.field_head(self.boundary, file.name), file.data, f"\r\n--{self.boundary}--\r\n".encode()]


def batches(files: Sequence[BenchFile], size: int) -> list[BenchFile]:
    """Group files `size` at a time into multipart bodies (fields named `file`, as the
    upload page sends them), built before the clock starts like the files themselves."""
    boundary = MultipartUpload.boundary
    out = []
    for start in range(0, len(files), size):
        group = files[start : start + size]
        body = bytearray()
        for file in group:
            body += MultipartUpload.field_head(boundary, file.name)
            body += file.data
            body += b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        out.append(
            BenchFile(
                name=f"{group[0].name} (+{len(group) - 1})",
                data=bytes(body),
                sop_instance_uid=group[0].sop_instance_uid,
                count=len(group),
                dicom_bytes=sum(f.size for f in group),
            )
        )
    return out


def zip_batches(files: Sequence[BenchFile], size: int) -> list[BenchFile]:
    """Group files `size` at a time into ZIP archives (stored, not compressed): how
    Orthanc's `POST /instances` takes several files in one request."""
    out = []
    for start in range(0, len(files), size):
        group = files[start : start + size]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for file in group:
                archive.writestr(file.name, file.data)
        out.append(
            BenchFile(
                name=f"{group[0].name} (+{len(group) - 1})",
                data=buffer.getvalue(),
                sop_instance_uid=group[0].sop_instance_uid,
                count=len(group),
                dicom_bytes=sum(f.size for f in group),
            )
        )
    return out


@dataclass(frozen=True)
class PreparedUpload(HttpUpload):
    """A body built beforehand (`batches`): sent as it is."""


def rest_batch_upload(token: str) -> HttpUpload:
    """POST /api/v1/instances/ with several multipart `file` fields per request (bodies
    from `batches`), with the headers of the one-field multipart upload."""
    multipart = rest_upload(token, raw=False)
    return PreparedUpload(path=multipart.path, headers=multipart.headers, expect=multipart.expect)


def rest_upload(token: str, *, raw: bool = True) -> HttpUpload:
    """POST /api/v1/instances/ with an application/dicom body (raw) or one multipart field."""
    if raw:
        return HttpUpload(
            path="/api/v1/instances/",
            headers={
                "Authorization": f"Token {token}",
                "Content-Type": "application/dicom",
                "Accept": "application/json",
            },
            expect=frozenset({201}),
        )
    boundary = MultipartUpload.boundary
    return MultipartUpload(
        path="/api/v1/instances/",
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Accept": "application/json",
        },
        expect=frozenset({201}),
    )


def orthanc_upload(*, archive: bool = False) -> HttpUpload:
    """Orthanc's REST `POST /instances` takes the raw Part 10 bytes as the body, or a
    ZIP archive of several files (`zip_batches`)."""
    content_type = "application/zip" if archive else "application/dicom"
    return HttpUpload(path="/instances", headers={"Content-Type": content_type}, expect=frozenset({200}))


class HttpWorker:
    """One keep-alive connection (http.client reconnects when a server closes it)."""

    def __init__(self, port: int, upload: HttpUpload, host: str = "127.0.0.1") -> None:
        import http.client

        self.upload = upload
        self.conn = http.client.HTTPConnection(host, port, timeout=300)

    def __call__(self, file: BenchFile) -> str | None:
        parts = self.upload.parts(file)
        try:
            self.conn.putrequest("POST", self.upload.path, skip_accept_encoding=True)
            for name, value in self.upload.headers.items():
                self.conn.putheader(name, value)
            self.conn.putheader("Content-Length", str(sum(len(p) for p in parts)))
            self.conn.endheaders()
            for part in parts:
                self.conn.send(part)
            response = self.conn.getresponse()
            body = response.read()
        except OSError as exc:
            self.conn.close()
            return f"{type(exc).__name__}: {exc}"
        if response.status not in self.upload.expect:
            return f"HTTP {response.status}: {body[:300].decode('utf-8', 'replace')}"
        return None

    def close(self) -> None:
        self.conn.close()


def http_get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- servers under test ---------------------------------------------------------------


class ServerProcess:
    """A server started for the benchmark and stopped by it, whatever happens.

    Only the process started here is signalled (by its pid). Its output goes to a log
    file whose tail is shown when it fails to start.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        port: int,
        ready_path: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_headers: dict[str, str] | None = None,
        start_timeout: float = 60,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.port = port
        self.ready_path = ready_path
        self.ready_headers = ready_headers or {}
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                status, _ = http_get(self.port, self.ready_path, self.ready_headers)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def orthanc_config(root: Path, port: int) -> dict[str, Any]:
    """Orthanc's defaults, except what isolates it: private folders, loopback HTTP only.

    SyncStorageArea is left at its default (true since Orthanc 1.7.4: fsync per file),
    like our PRECEDENT_FSYNC; no plugins are loaded (the Debian config would load the
    DICOMweb plugin, which does nothing on ingest).
    """
    return {
        "Name": "precedent-bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }


@contextlib.contextmanager
def orthanc_server(binary: Path, root: Path) -> Iterator[ServerProcess]:
    """Orthanc on a free port with its storage and SQLite index under `root`."""
    port = free_port()
    config = root / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(root, port), indent=2))
    server = ServerProcess(
        "Orthanc", [str(binary), str(config)], port=port, ready_path="/system", log_path=root / "orthanc.log"
    )
    with server:
        yield server


def orthanc_version(port: int) -> str:
    try:
        status, body = http_get(port, "/system")
        return json.loads(body).get("Version", "?") if status == 200 else "?"
    except (OSError, ValueError):
        return "?"


def cpu_conditions() -> dict[str, Any]:
    """What makes figures comparable between runs: cores and load during the run."""
    return {"cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()]}


# --- output ---------------------------------------------------------------------------

_COLUMNS = (
    ("kind", "{}"),
    ("path", "{}"),
    ("clients", "{}"),
    ("instances", "{}"),
    ("errors", "{}"),
    ("seconds", "{:.2f}"),
    ("instances/s", "{:.1f}"),
    ("MB/s", "{:.1f}"),
    ("p50 ms", "{:.1f}"),
    ("p99 ms", "{:.1f}"),
    ("rounds, instances/s", "{}"),
)


def format_table(rows: Sequence[Figures]) -> str:
    """A Markdown table (text left, numbers right), so it can go into the README as is."""
    cells = [
        [
            fmt.format(value)
            for (_, fmt), value in zip(
                _COLUMNS,
                (
                    f.kind,
                    f.path,
                    f.clients,
                    f.instances,
                    f.errors,
                    f.seconds,
                    f.instances_per_s,
                    f.mb_per_s,
                    f.p50_ms,
                    f.p99_ms,
                    " / ".join(f"{rate:.0f}" for rate in f.round_rates),
                ),
                strict=True,
            )
        ]
        for f in rows
    ]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, (name, _) in enumerate(_COLUMNS)]
    text = {0, 1, len(_COLUMNS) - 1}

    def line(values: Sequence[str]) -> str:
        padded = [v.ljust(w) if i in text else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i not in text else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line([name for name, _ in _COLUMNS]), rule, *(line(row) for row in cells)])


def ratios(rows: Sequence[Figures], ours: str = "rest", reference: str = "orthanc") -> list[str]:
    """One line per (kind, clients) that both paths ran: our rate as a share of theirs."""
    index = {(f.kind, f.path, f.clients): f for f in rows}
    lines = []
    for f in rows:
        if f.path != ours:
            continue
        ref = index.get((f.kind, reference, f.clients))
        if ref is None or not ref.instances_per_s:
            continue
        lines.append(
            f"{f.kind} × {f.clients} client(s): {ours} {f.instances_per_s:.1f}/s vs {reference} "
            f"{ref.instances_per_s:.1f}/s = {f.instances_per_s / ref.instances_per_s:.2f}×"
        )
    return lines


# --- profile --------------------------------------------------------------------------

# (label, file suffix, function name): cumulative time of these functions per instance.
PROFILE_PHASES: tuple[tuple[str, str, str], ...] = (
    ("instance_ingest (total)", "studies/services.py", "instance_ingest"),
    ("  spool: copy + sha256 + fsync", "studies/storage.py", "_copy"),
    ("    sha256", "~", "<method 'update' of '_hashlib.HASH' objects>"),
    ("    write", "~", "<method 'write' of '_io.BufferedWriter' objects>"),
    ("  parse + validate: read_header", "studies/dicom.py", "read_header"),
    ("    pydicom dcmread", "pydicom/filereader.py", "dcmread"),
    ("  advisory locks", "studies/services.py", "_lock_instances"),
    ("  store.place: rename (folder fsync started)", "studies/storage.py", "place"),
    ("  os.fsync, all (spool file + folder)", "~", "<built-in method posix.fsync>"),
    ("  rows: INSERT, lookups, new series", "studies/services.py", "_insert_or_find"),
    ("  SQL round trips (all)", "django/db/backends/utils.py", "_execute"),
    ("  spooled.discard", "studies/storage.py", "discard"),
)


def profile_phases(stats: pstats.Stats, instances: int) -> list[tuple[str, float, int]]:
    """(label, ms per instance, calls) for PROFILE_PHASES, from a cProfile run.

    cProfile inflates pure-Python work (pydicom, the ORM) more than C calls (hashing,
    fsync), so read the shares, and confirm a saving by timing without the profiler.
    """
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    out = []
    for label, suffix, func in PROFILE_PHASES:
        total = 0.0
        calls = 0
        for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in raw.items():
            if name == func and (filename == suffix or filename.endswith(suffix)):
                total += ct
                calls += nc
        out.append((label, total * 1000 / max(instances, 1), calls))
    return out
