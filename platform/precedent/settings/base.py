"""Settings shared by every environment. Everything comes from the environment.

PRECEDENT_HOME (default ./var) holds everything the platform writes: the embedded
database, DICOM files, render caches, index files and model weights.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_choice, env_float, env_int, env_list, env_str

REPO_ROOT = Path(__file__).resolve().parents[3]

PRECEDENT_HOME = Path(env_str("PRECEDENT_HOME") or REPO_ROOT / "var").resolve()
PRECEDENT_HOME.mkdir(parents=True, exist_ok=True)

DEBUG = False
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])


def secret_key_from_env_or_home() -> str:
    """DJANGO_SECRET_KEY, or a key generated once into PRECEDENT_HOME (embedded demo)."""
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        return key
    path = PRECEDENT_HOME / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = secret_key_from_env_or_home()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.contrib.postgres",
    "rest_framework",
    "rest_framework.authtoken",
    "django_htmx",
    "precedent",
    "studies",
    "embeddings",
    "triage",
    "dicomweb",
    "dimse",
    "exports",
    "access",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # After authentication and htmx: enforces access/policy.py on pages, audits everything.
    "access.middleware.AccessMiddleware",
    # Last: the CSRF check of a form POST reads the whole body (every uploaded file) to
    # find the token, so the login and access checks above refuse first, unread.
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "precedent.urls"
WSGI_APPLICATION = "precedent.wsgi.application"
ASGI_APPLICATION = "precedent.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [REPO_ROOT / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: DATABASE_URL points at any PostgreSQL; unset, an embedded one (pgserver)
# runs under PRECEDENT_HOME and starts with the first connection.
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL (postgres://...)")
else:
    DATABASES = {
        "default": {
            "ENGINE": "precedent.embedded_postgres",
            "NAME": "precedent",
            "USER": "postgres",
            "OPTIONS": {"pgdata": str(PRECEDENT_HOME / "postgres"), "main_database": "precedent"},
            # Opening a connection costs ~3.6 ms here, as much as storing a CT slice.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "triage:worklist"  # the radiologist's home page
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = PRECEDENT_HOME / "static"  # collectstatic's output (served by WhiteNoise)
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [REPO_ROOT / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Uploads: files over 2.5 MB spool to a temp file under PRECEDENT_HOME, never RAM.
FILE_UPLOAD_TEMP_DIR = PRECEDENT_HOME / "tmp"
FILE_UPLOAD_TEMP_DIR.mkdir(exist_ok=True)
# Largest accepted upload request; larger ones get 413 before their body is read.
PRECEDENT_MAX_UPLOAD_BYTES = env_int("PRECEDENT_MAX_UPLOAD_BYTES", 1024**3, minimum=1)
# fsync each stored DICOM file before its row commits (durability over speed).
PRECEDENT_FSYNC = env_bool("PRECEDENT_FSYNC", True)
# Rendered PNGs (previews, thumbnails, WADO-RS renderings) kept under PRECEDENT_HOME/cache/render:
# above this many MB the least recently used go (studies.render_cache).
PRECEDENT_RENDER_CACHE_MB = env_int("PRECEDENT_RENDER_CACHE_MB", 2048, minimum=1)

# Background jobs (embedding, triage): "thread" runs them in an in-process worker
# (nothing to start), "celery" sends them to Celery (the default once a broker is
# configured), "inline" runs them in the caller once its transaction commits.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL")
PRECEDENT_WORKER = env_str("PRECEDENT_WORKER") or ("celery" if CELERY_BROKER_URL else "thread")
if PRECEDENT_WORKER not in {"thread", "celery", "inline"}:
    raise ImproperlyConfigured(f"PRECEDENT_WORKER must be thread, celery or inline, got {PRECEDENT_WORKER!r}")
if PRECEDENT_WORKER == "celery" and not CELERY_BROKER_URL:
    raise ImproperlyConfigured("PRECEDENT_WORKER=celery needs CELERY_BROKER_URL")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# Similar-case search: the FAISS index type ("auto": exact up to the threshold, then
# approximate), and the number of vectors above which "auto" goes approximate.
PRECEDENT_INDEX_TYPE = env_str("PRECEDENT_INDEX_TYPE", "auto")
if PRECEDENT_INDEX_TYPE not in {"auto", "flat", "hnsw", "ivf"}:
    raise ImproperlyConfigured(f"PRECEDENT_INDEX_TYPE must be auto, flat, hnsw or ivf, got {PRECEDENT_INDEX_TYPE!r}")
PRECEDENT_INDEX_APPROX_THRESHOLD = env_int("PRECEDENT_INDEX_APPROX_THRESHOLD", 20_000, minimum=0)
# Where searches run when faiss sees a GPU: "auto" (on the GPU copy), "on" (the same, and
# a warning where no GPU is usable) or "off" (the CPU index: at 1M×512 a single query on
# CPU HNSW took 0.6 ms at recall 0.98, the exact GPU copy 4 ms; see README, GPU).
PRECEDENT_INDEX_GPU = env_str("PRECEDENT_INDEX_GPU", "auto")
if PRECEDENT_INDEX_GPU not in {"auto", "on", "off"}:
    raise ImproperlyConfigured(f"PRECEDENT_INDEX_GPU must be auto, on or off, got {PRECEDENT_INDEX_GPU!r}")
# How often a process checks PostgreSQL for embeddings other processes added or deleted.
PRECEDENT_INDEX_SYNC_SECONDS = env_float("PRECEDENT_INDEX_SYNC_SECONDS", 1.0, minimum=0)
# New images are embedded once no new image has arrived for this many seconds (at most
# ten times that after the first), in batches, rather than one job per stored image
# beside the request that stored it. 0 embeds after every stored image.
PRECEDENT_EMBED_SETTLE_SECONDS = env_float("PRECEDENT_EMBED_SETTLE_SECONDS", 1.0, minimum=0)

# Triage: finding classes that make a study urgent ("pathology:class", * = any; a bare
# class = any pathology), the triage tasks images are checked for, and the share of
# likely-negative studies read anyway for QA (a hash of seed + study UID picks them).
PRECEDENT_URGENT_FINDINGS = env_list(
    "PRECEDENT_URGENT_FINDINGS",
    ["malignant:mass", "malignant:SPIC", "malignant:CIRC", "malignant:MISC", "*:pneumothorax"],
)
PRECEDENT_TRIAGE_TASKS = env_list("PRECEDENT_TRIAGE_TASKS", ["mammography", "chest"])
PRECEDENT_TRIAGE_QA_FRACTION = env_float("PRECEDENT_TRIAGE_QA_FRACTION", 0.05, minimum=0)
PRECEDENT_TRIAGE_QA_SEED = env_str("PRECEDENT_TRIAGE_QA_SEED", "precedent-qa")
# Arriving images are triaged once their series has had no new image for this many
# seconds (at most ten times that after the first), so a study is scored once it is
# complete, not once per image. 0 triages after every stored image.
PRECEDENT_TRIAGE_SETTLE_SECONDS = env_float("PRECEDENT_TRIAGE_SETTLE_SECONDS", 2.0, minimum=0)
# Scores: P(malignant) of an exam at or above which the classifier calls it suspicious,
# and the detector scores at or above which a box of an urgent class makes a study
# urgent, or any box makes it at least suspicious. All probabilities in 0..1.
PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = env_float("PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT", 0.5, minimum=0)
PRECEDENT_TRIAGE_URGENT_DETECTION_SCORE = env_float("PRECEDENT_TRIAGE_URGENT_DETECTION_SCORE", 0.8, minimum=0)
PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE = env_float("PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE", 0.5, minimum=0)
for _name in (
    "PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT",
    "PRECEDENT_TRIAGE_URGENT_DETECTION_SCORE",
    "PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE",
):
    if not 0.0 <= globals()[_name] <= 1.0:
        raise ImproperlyConfigured(f"{_name} must be between 0 and 1, got {globals()[_name]}")

# Exports: the most instances one de-identified export (a zip) may hold; larger
# selections are refused with a reason instead of tying up a worker for long.
PRECEDENT_EXPORT_MAX_INSTANCES = env_int("PRECEDENT_EXPORT_MAX_INSTANCES", 2000, minimum=1)

# DICOM C-STORE listener (`manage.py dicom_listener`): its AE title, address and port,
# the calling AE titles it accepts (empty: any), and whether senders must call its title.
PRECEDENT_DICOM_AE_TITLE = env_str("PRECEDENT_DICOM_AE_TITLE", "PRECEDENT")
PRECEDENT_DICOM_BIND = env_str("PRECEDENT_DICOM_BIND", "127.0.0.1")
PRECEDENT_DICOM_PORT = env_int("PRECEDENT_DICOM_PORT", 11112, minimum=1, maximum=65535)
PRECEDENT_DICOM_ALLOWED_AE_TITLES = env_list("PRECEDENT_DICOM_ALLOWED_AE_TITLES", [])
PRECEDENT_DICOM_REQUIRE_CALLED_AE_TITLE = env_bool("PRECEDENT_DICOM_REQUIRE_CALLED_AE_TITLE", True)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # DRF's TokenAuthentication, loading the user's roles and the token's scopes too.
        "access.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Roles and token scopes from access/policy.py (401 without credentials, as before).
    "DEFAULT_PERMISSION_CLASSES": ["access.permissions.PolicyPermission"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "precedent.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Precedent API",
    "DESCRIPTION": "Similar-case search and worklist triage for radiology: studies, instances, search.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the installed sidecar package: no CDN (hospital networks are often offline).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["precedent.api.rest_api_only"],
    "ENUM_NAME_OVERRIDES": {
        "TriageCategoryEnum": "triage.models.Category",
        "AiDicomKindEnum": "exports.models.AiDicomResult.Kind",
        "EmbeddingKindEnum": "embeddings.models.Embedding.Kind",
    },
}

PRECEDENT_LOG_LEVEL = env_choice(
    "PRECEDENT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), upper=True
)
# Read by the pure cores (embeddings/index.py, embeddings/encoder.py) from the
# environment; checked here so that a bad value fails at start, not in the first search.
env_int("PRECEDENT_FAISS_SEARCH_THREADS", 1, minimum=1)
env_int("PRECEDENT_FAISS_BATCH_THREADS", 0, minimum=0)
env_int("PRECEDENT_TORCH_THREADS", 1, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": PRECEDENT_LOG_LEVEL},
    "loggers": {"pgserver": {"level": "WARNING"}, "faiss.loader": {"level": "WARNING"}},
}
