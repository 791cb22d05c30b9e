"""The OpenAPI schema at /api/v1/schema/: complete, valid, public without leaking data,
and true to the live API (a bounded schemathesis run against a live server).

The schema and its Swagger UI are public, as integrators expect (a client generator or
a gateway fetches the schema without a token): they describe the API, never its data.
Every operation in them still needs a token or a session.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.validation import validate_schema

SCHEMA_URL = "/api/v1/schema/"
DOCS_URL = "/api/v1/schema/docs/"
API_PREFIX = "api/v1/"
METHODS = ("get", "post", "put", "patch", "delete")
CT = "pydicom-test_files/CT_small.dcm"


def fetch_schema(client) -> dict:
    response = client.get(SCHEMA_URL, {"format": "json"})
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    return json.loads(response.content)


def url_routes(patterns=None, prefix: str = "") -> Iterator[tuple[str, Callable]]:
    """Every route of the URLconf as (route, view), includes followed."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from url_routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def api_endpoints() -> dict[str, set[str]]:
    """/api/v1/ paths in OpenAPI spelling ({name} for <conv:name>), each with the HTTP
    methods its view answers (empty when the view is not a DRF view)."""
    endpoints = {}
    for route, view in url_routes():
        if not route.startswith(API_PREFIX) or route.startswith(SCHEMA_URL.lstrip("/")):
            continue
        path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
        cls = getattr(view, "cls", None)
        endpoints[path] = {m for m in METHODS if cls is not None and hasattr(cls, m)}
    return endpoints


def operations(schema: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


# --- the schema and the docs page -------------------------------------------------------


@pytest.mark.django_db
def test_schema_is_valid_openapi_and_lists_every_api_endpoint(client):
    schema = fetch_schema(client)  # anonymous: the schema is public
    validate_schema(schema)
    assert schema["openapi"].startswith("3.")

    endpoints = api_endpoints()
    assert len(endpoints) >= 9, endpoints  # the resolver walk found the API at all
    documented = {path: set(item) & set(METHODS) for path, item in schema["paths"].items()}
    # A new /api/v1/ endpoint that the schema misses (a plain Django view, say) fails here.
    assert {p: m for p, m in documented.items() if p.startswith("/" + API_PREFIX)} == endpoints


@pytest.mark.django_db
def test_every_operation_has_request_and_response_schemas(client):
    schema = fetch_schema(client)
    components = schema["components"]["schemas"]
    ids = [operation["operationId"] for _, _, operation in operations(schema)]
    assert len(ids) == len(set(ids)), ids
    assert {"tokenAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])

    def resolve(media: dict) -> dict:
        ref = media["schema"].get("$ref")
        return components[ref.rsplit("/", 1)[1]] if ref else media["schema"]

    for path, method, operation in operations(schema):
        where = f"{method.upper()} {path}"
        assert {"tokenAuth": []} in operation["security"] and {"cookieAuth": []} in operation["security"], where
        assert {} not in operation["security"], f"{where} must not be documented as anonymous"
        for parameter in operation.get("parameters", []):
            assert "schema" in parameter, (where, parameter)
        if method in ("post", "put", "patch"):
            content = operation["requestBody"]["content"]
            assert content and all("schema" in media for media in content.values()), where
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), where
        assert {"401", "403"} <= set(responses), where
        for code, response in responses.items():
            assert response.get("content"), f"{where} {code} has no body schema"
            for media_type, media in response["content"].items():
                body = resolve(media)
                if code.startswith("2"):
                    assert body, (where, code, media_type)
                else:  # every error has the one error shape
                    assert media_type == "application/json", (where, code)
                    assert "error" in body["required"] and body["properties"]["error"]["type"] == "string"


def test_schema_request_forms_that_integrators_rely_on(client, db):
    paths = fetch_schema(client)["paths"]
    upload = paths["/api/v1/instances/"]["post"]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data", "application/dicom"}
    assert upload["application/dicom"]["schema"] == {"type": "string", "format": "binary"}
    search = paths["/api/v1/search/"]["post"]["requestBody"]["content"]
    assert set(search) == {"application/json", "multipart/form-data"}
    file = paths["/api/v1/instances/{sop_instance_uid}/file"]["get"]["responses"]["200"]["content"]
    assert set(file) == {"application/dicom"}
    for name in ("preview.png", "thumbnail.png"):
        operation = paths[f"/api/v1/instances/{{sop_instance_uid}}/{name}"]["get"]
        assert set(operation["responses"]["200"]["content"]) == {"image/png"}
        assert {"frame", "preset", "wc", "ww", "size"} <= {p["name"] for p in operation["parameters"]}
    studies = {p["name"] for p in paths["/api/v1/studies/"]["get"]["parameters"]}
    assert {"q", "patient_id", "modality", "date_from", "date_to", "sort", "page", "page_size"} <= studies


def test_search_documentation_serializers_cover_search_input():
    """The schema describes SearchInput with three request forms; they must not drift."""
    from embeddings import apis

    real = set(apis.SearchInput().fields)
    forms = [apis.SearchByInstanceInput, apis.SearchByVectorInput, apis.SearchByFileInput]
    assert set().union(*(set(form().fields) for form in forms)) == real
    for name, field in apis._SearchOptions().fields.items():
        assert type(field) is type(apis.SearchInput().fields[name]), name


@pytest.mark.django_db
def test_docs_page_is_public_and_the_schema_leaks_no_data(client, dicom_files):
    from studies import services

    instance = services.instance_ingest(source=dicom_files / CT).instance
    study = instance.series.study
    response = client.get(DOCS_URL)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert SCHEMA_URL in page and "SwaggerUIBundle" in page
    # Swagger UI comes from the installed sidecar package, never from a CDN.
    assert "drf_spectacular_sidecar/swagger-ui-dist" in page and "cdn." not in page
    schema = client.get(SCHEMA_URL).content.decode()  # YAML by default
    for value in (instance.sop_instance_uid, study.study_instance_uid, study.patient.patient_id):
        assert value not in schema and value not in page
    # The operations the schema describes still need credentials.
    assert client.get("/api/v1/studies/").status_code == 401


# --- schemathesis against the live server -----------------------------------------------

# Examples per operation and pass: generated values, the same with stored identifiers and
# real files swapped in, then data that breaks the schema (which must get a 4xx, not a 5xx).
EXAMPLES = {"generated": 20, "real data": 20, "negative": 10}


@pytest.fixture
def live_archive(transactional_db, datasets: Path, dicom_files: Path, tmp_path: Path, django_user_model, settings):
    """Real rows for the GET endpoints to return: CT, multi-frame MR, an SR without
    pixels, 4 MIAS films with lesion boxes and detector boxes, all embedded by an active
    tiny encoder."""
    from rest_framework.authtoken.models import Token

    from embeddings import encoder as enc
    from embeddings import services as search_services
    from studies import services
    from studies.datasets import mias
    from studies.datasets.importer import import_conversion
    from studies.models import Instance

    search_services.forget_indexes()
    for name in (CT, "pydicom-data/emri_small.dcm", "pydicom-test_files/test-SR.dcm"):
        assert services.instance_ingest(source=dicom_files / name).ok, name
    import_conversion(mias.read(datasets / "mini-mias", limit=4), cohort="mias-small", progress=False)
    model = enc.build_encoder("resnet18", dim=32, preprocessing=enc.Preprocessing(input_size=64))
    enc.save_encoder(tmp_path / "tiny.pt", model)
    version = search_services.encoder_register(path=tmp_path / "tiny.pt", name="tiny")
    search_services.encoder_activate(encoder=version, wait=True)
    user = django_user_model.objects.create_user(username="integrator", password="a-long-test-password")
    # Roles that reach every endpoint, so the run gets past 403 to the real answers.
    from access.services import role_grant

    role_grant(user=user, roles=["integrator", "radiologist"])
    # Detector output on the films, so that storing AI results as DICOM SR has something to store.
    import numpy as np
    from PIL import Image

    from triage.models import Detection, SegmentationMask, TriageModelVersion

    detector = TriageModelVersion.objects.create(
        name="openapi-detector", kind="detector", architecture="fcos-resnet18", weights_path="-", sha256="0" * 64
    )
    segmenter = TriageModelVersion.objects.create(
        name="openapi-segmenter", kind="segmenter", architecture="unet-small", weights_path="-", sha256="0" * 64
    )
    masks = []
    for film in Instance.objects.filter(series__modality="MG"):
        Detection.objects.create(
            instance=film, model_version=detector, label="CIRC", score=0.9, x0=100, y0=120, x1=180, y1=200
        )
        pixels = np.zeros((film.rows, film.columns), dtype=np.uint8)
        pixels[120:200, 100:180] = 255
        relative = Path("masks") / f"{film.sop_instance_uid}-lesion.png"
        (settings.PRECEDENT_HOME / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(settings.PRECEDENT_HOME / relative)
        masks.append(
            SegmentationMask.objects.create(
                instance=film, model_version=segmenter, label="lesion", mask_path=str(relative), area_fraction=0.01
            )
        )
    instances = list(Instance.objects.select_related("series__study").order_by("pk"))
    yield {
        "token": Token.objects.create(user=user).key,
        "sop_instance_uid": [i.sop_instance_uid for i in instances],
        "study_instance_uid": sorted({i.series.study.study_instance_uid for i in instances}),
        "mask": [(m.instance.sop_instance_uid, m.pk) for m in masks],
    }
    search_services.forget_indexes()


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((96, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_real_data(strategy, archive: dict, make_dicom):
    """Cases with stored UIDs in place of generated ones, real files in place of random
    bytes and vectors of the encoder's dimension: the paths past the 404s and 400s."""
    from hypothesis import strategies as st

    uids = st.sampled_from(archive["sop_instance_uid"])
    studies = st.sampled_from(archive["study_instance_uid"])

    def swap(drawn):
        case, uid, other, study, mask = drawn
        if case.path_parameters and "mask_id" in case.path_parameters:
            case.path_parameters["sop_instance_uid"], case.path_parameters["mask_id"] = mask
        elif case.path_parameters:
            if "sop_instance_uid" in case.path_parameters:
                case.path_parameters["sop_instance_uid"] = uid
            if "study_instance_uid" in case.path_parameters:
                case.path_parameters["study_instance_uid"] = study
        body = case.body
        if isinstance(body, bytes) and case.media_type == "application/dicom":
            case.body = make_dicom()
        elif isinstance(body, dict):
            for key, value in {"sop_instance_uid": uid, "result_sop_instance_uid": uid}.items():
                if key in body:
                    body[key] = value
            if isinstance(body.get("sop_instance_uids"), list):
                body["sop_instance_uids"] = [uid]
            if isinstance(body.get("study_instance_uids"), list):
                body["study_instance_uids"] = [study]
            if body.get("query_sop_instance_uid"):
                body["query_sop_instance_uid"] = other
            if "vector" in body and isinstance(body["vector"], list) and body["vector"]:
                body["vector"] = (body["vector"] * 32)[:32]
            if case.operation.path == "/api/v1/instances/" and "file" in body:
                body["file"] = [make_dicom()]
            elif "file" in body:
                body["file"] = png_bytes()
        return case

    return st.tuples(strategy, uids, uids, studies, st.sampled_from(archive["mask"])).map(swap)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(live_server, live_archive, make_dicom):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    # The raw-body upload: random bytes for the strategy, real DICOM bytes when swapped.
    schemathesis.serializer.alias("application/dicom", "application/octet-stream")
    schema = schemathesis.openapi.from_url(f"{live_server.url}{SCHEMA_URL}?format=json")
    headers = {"Authorization": f"Token {live_archive['token']}"}
    failures: dict[str, str] = {}
    statuses: dict[str, list[int]] = {}

    def fuzz(label: str, strategy, examples: int) -> None:
        # Derandomized and bounded: the same cases on every run, no example database, no
        # shrinking (failures are collected and reported once per operation and kind).
        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case):
            response = case.call(base_url=live_server.url, headers=headers, timeout=60)
            statuses.setdefault(label, []).append(response.status_code)
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (AssertionError, BaseExceptionGroup) as exc:
                for failure in getattr(exc, "exceptions", [exc]):
                    title = getattr(failure, "title", type(failure).__name__)
                    failures.setdefault(f"{label}: {title}", f"{case.as_curl_command(headers)}\n{failure}")

        try:
            run()
        except Unsatisfiable:
            # Negative data needs something to break: a path parameter that takes any
            # string has no invalid value.
            assert label.endswith("(negative)"), label

    started = time.monotonic()
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        fuzz(f"{operation.label} (generated)", operation.as_strategy(), EXAMPLES["generated"])
        real = with_real_data(operation.as_strategy(), live_archive, make_dicom)
        fuzz(f"{operation.label} (real data)", real, EXAMPLES["real data"])
        negative = operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)
        fuzz(f"{operation.label} (negative)", negative, EXAMPLES["negative"])
    elapsed = time.monotonic() - started

    calls = sum(len(codes) for codes in statuses.values())
    summary = {label: sorted(set(codes)) for label, codes in statuses.items()}
    print(f"\nschemathesis: {calls} calls over {len(labels)} operations in {elapsed:.1f} s")
    for label, codes in summary.items():
        print(f"  {label}: {codes}")
    report = "\n\n".join(f"{key}\n{detail}" for key, detail in sorted(failures.items()))
    assert not failures, f"{len(failures)} kinds of failure in {calls} calls:\n\n{report}"
    assert len(labels) == len(set(labels)) >= 9, labels
    # Not a vacuous pass (every answer a documented 401, say): each operation succeeded.
    for label in labels:
        assert any(200 <= code < 300 for code in statuses[f"{label} (real data)"]), (label, summary)
