"""python manage.py load_demo [--data PATH] [--synthetic]: a demo login and data to look at.

Safe to run again: images already stored are reported as duplicates, findings are
updated in place, and the demo password stays the one generated the first time.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from pydicom.data import get_testdata_files
from tqdm import tqdm

from precedent.commands import quiet_per_item_logs
from studies import services
from studies.datasets import FOLDER_DATASETS, SYNTHETIC_COHORT, DatasetError, synthetic
from studies.datasets.importer import import_conversion
from studies.models import Instance
from studies.services import Outcome

from .import_dataset import report

DEMO_USERNAME = "demo"
LOGIN_FILE = "demo-login.txt"


class Command(BaseCommand):
    help = (
        "Create the demo login (user 'demo', password generated once and kept in PRECEDENT_HOME/demo-login.txt) "
        "and load demo data: pydicom's bundled test files (the broken ones are rejected, by design), then the "
        "real datasets (mini-MIAS, CBIS-DDSM samples, NIH ChestX-ray14 boxes, the DDSM normals and Mini-DDSM "
        "benign samples) from --data or ../shared/datasets "
        "next to the repository, or, when neither is there, a synthetic screening cohort. Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--data",
            type=Path,
            help="folder holding any of: " + ", ".join(f"{folder}/" for _, _, folder in FOLDER_DATASETS.values()),
        )
        parser.add_argument(
            "--synthetic", action="store_true", help="also generate the synthetic cohort when real data is found"
        )
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="where the server will listen (printed)")
        parser.add_argument(
            "--no-encoder", action="store_true", help="do not train the quick demo encoder for similar-case search"
        )
        parser.add_argument(
            "--no-triage", action="store_true", help="do not train, calibrate and sign off the quick demo classifier"
        )

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        _require_migrated()
        data = _data_root(options["data"])
        found = [name for name, (_, _, folder) in FOLDER_DATASETS.items() if data and (data / folder).is_dir()]
        if options["data"] and not found:
            raise CommandError(f"{data} holds none of: {', '.join(f for _, _, f in FOLDER_DATASETS.values())}")
        password_line = _demo_login(options["url"])

        for name in found:
            reader, cohort, folder = FOLDER_DATASETS[name]
            try:
                conversion = reader(data / folder)
            except DatasetError as exc:
                self.stderr.write(f"{name}: skipped: {exc}")
                continue
            report(self, import_conversion(conversion, cohort=cohort))
        if not found or options["synthetic"]:
            if not found:
                self.stdout.write("no real datasets found: generating the synthetic screening cohort")
            report(self, import_conversion(synthetic.read(), cohort=SYNTHETIC_COHORT))
        # Last: the worklist reads oldest first, so it opens on the screening studies,
        # not on pydicom's conformance files (SR, RT plans, odd modalities).
        self._pydicom_test_files()
        if not options["no_encoder"]:
            self._demo_encoder()
        if not options["no_triage"]:
            self._demo_triage()
        self.stdout.write(self.style.SUCCESS(password_line))

    def _demo_encoder(self) -> None:
        """A quickly trained encoder, so that similar-case search works in the demo.

        Two epochs at 128 px on the mammography cohort: about a minute on two cores,
        enough to show the workflow, not to judge retrieval (train one with
        `train_encoder` for that). Left alone once any encoder version exists.
        """
        from django.core.management import call_command

        from embeddings import services as embedding_services
        from embeddings.models import EncoderVersion

        if EncoderVersion.objects.exists():
            self.stdout.write("encoder versions exist: the demo encoder is not trained again")
            return
        for cohort in ("mias", SYNTHETIC_COHORT):
            images = Instance.objects.filter(series__study__cohorts__name=cohort, has_pixel_data=True).count()
            if images >= DEMO_ENCODER_MIN_IMAGES:
                break
        else:
            self.stdout.write("no cohort with enough images for a demo encoder: similar-case search waits for one")
            return
        call_command(
            "train_encoder", "--cohort", cohort, "--epochs", "2", "--input-size", "128", "--batch-size", "16",
            "--name", DEMO_ENCODER, stdout=self.stdout, verbosity=1,
        )  # fmt: skip
        embedding_services.encoder_activate(encoder=EncoderVersion.objects.get(name=DEMO_ENCODER), wait=True)
        self.stdout.write(
            f"{DEMO_ENCODER} serves similar-case search (a quick demo; train a real one with train_encoder)"
        )

    def _demo_triage(self) -> None:
        """A quickly trained mammogram classifier, calibrated on other patients and signed
        off as the demo admin, so the demo worklist sorts studies instead of leaving them
        all pending. Two epochs on the mammography cohort (about a minute or two on two
        cores): it shows the workflow and the calibration page, it is no screening model.
        Left alone once any classifier version exists.
        """
        from django.core.management import call_command

        from triage.models import TriageModelVersion

        if TriageModelVersion.objects.filter(kind=TriageModelVersion.Kind.CLASSIFIER).exists():
            self.stdout.write("a triage classifier exists: the demo classifier is not trained again")
            return
        for cohort in ("mias", SYNTHETIC_COHORT):
            if Instance.objects.images().filter(series__study__cohorts__name=cohort).count() >= DEMO_TRIAGE_MIN_IMAGES:
                break
        else:
            self.stdout.write("no mammography cohort large enough for a demo classifier: studies wait as pending")
            return
        train, validation = f"{cohort}-triage-train", f"{cohort}-triage-validation"
        services.cohort_split(source=cohort, parts={train: 0.7, validation: 0.3}, seed=0)
        call_command(
            "train_triage", "--cohort", train, "--epochs", "2", "--name", DEMO_CLASSIFIER, "--activate",
            stdout=self.stdout, verbosity=1,
        )  # fmt: skip
        # The demo trains a classifier only: its point is on the classifier's score.
        call_command(
            "calibrate_triage",
            "--cohort",
            validation,
            "--score",
            "classifier",
            "--sign-off",
            DEMO_USERNAME,
            stdout=self.stdout,
        )
        call_command("triage", "--pending", stdout=self.stdout)
        self.stdout.write(
            f"{DEMO_CLASSIFIER} triages the worklist, signed off by {DEMO_USERNAME} on {validation} "
            "(a quick demo; see the calibration page for what it is worth)"
        )

    def _pydicom_test_files(self) -> None:
        """Every file pydicom ships for its own tests: a wide spread of transfer
        syntaxes and modalities, and deliberately broken files that show rejection."""
        outcomes: Counter[str] = Counter()
        files = [path for path in map(Path, get_testdata_files()) if path.is_file()]  # it lists folders too
        for path in tqdm(files, desc="pydicom test files", unit="file", disable=None):
            outcomes[services.instance_ingest(source=path, name=path.name).outcome] += 1
        self.stdout.write(
            f"pydicom test files: {sum(outcomes.values())} files: {outcomes[Outcome.STORED]} stored, "
            f"{outcomes[Outcome.DUPLICATE]} duplicate, {outcomes[Outcome.REJECTED]} rejected "
            "(not DICOM, broken on purpose, or no decoder)"
        )


DEMO_ENCODER = "demo-resnet18"
DEMO_ENCODER_MIN_IMAGES = 32
DEMO_CLASSIFIER = "demo-classifier"
DEMO_TRIAGE_MIN_IMAGES = 32


def _require_migrated() -> None:
    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        raise CommandError("the database is not migrated: run `python manage.py migrate` first")


def _data_root(given: Path | None) -> Path | None:
    if given is not None:
        given = given.expanduser()
        if not given.is_dir():
            raise CommandError(f"--data {given} is not a folder")
        return given
    default = Path(settings.REPO_ROOT).parent / "shared" / "datasets"
    return default if default.is_dir() else None


def _demo_login(url: str) -> str:
    """Make sure the demo user exists; return the line that tells how to log in.

    The password is generated once and kept in PRECEDENT_HOME (which also holds the
    embedded database), so every run prints the same working credentials.
    """
    path = Path(settings.PRECEDENT_HOME) / LOGIN_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    password = lines[1].strip() if len(lines) > 1 else ""
    user_model = get_user_model()
    user = user_model.objects.filter(username=DEMO_USERNAME).first()
    if user is None:
        password = password or secrets.token_urlsafe(12)
        user_model.objects.create_superuser(username=DEMO_USERNAME, email="", password=password)
    elif not password or not user.check_password(password):
        # Someone set this user up or changed its password: leave it as it is.
        return f"Log in at {url} as {DEMO_USERNAME} (its password was set outside load_demo)"
    if len(lines) < 2:
        # Created readable by the owner only, before the password is written into it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{DEMO_USERNAME}\n{password}\n")
    # The demo login is a superuser (every permission); one login per role shows what
    # each may do (access/policy.py).
    from access.services import demo_role_users

    role_users = ", ".join(demo_role_users(password=password))
    return f"Log in at {url} as {DEMO_USERNAME} / {password}\nOne login per role, same password: {role_users}"
