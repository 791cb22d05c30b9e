#!/usr/bin/env python
"""DICOMweb parity with Orthanc 1.10 and its DICOMweb plugin.

    python bench/dicomweb_parity.py                      # every file of dicom-test-files
    python bench/dicomweb_parity.py --files a.dcm b.dcm  # these files only
    python bench/dicomweb_parity.py --json report.json

Everything runs in a temporary folder that is removed afterwards: our platform on a
fresh embedded PostgreSQL (migrated, one user with a DRF token) under gunicorn, and
Orthanc with a private storage, a free loopback port, remote access and
authentication off, and the DICOMweb plugin at /dicom-web/. The same files go to
both over STOW-RS, the same QIDO-RS queries run against both, and the answers are
compared (see platform/dicomweb/parity.py for what counts as the same).

Exit status: 0 when every difference is a known, explained one; 1 otherwise; 2 when
Orthanc or its DICOMweb plugin is not installed (nothing was compared).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "platform"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DATASET = REPO_ROOT.parent / "shared" / "datasets" / "dicom-test-files"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", type=Path, help="files to send (default: the dataset's manifest)")
    parser.add_argument("--dataset", type=Path, default=DATASET, help="dicom-test-files folder (default %(default)s)")
    parser.add_argument("--orthanc", type=Path, default=ORTHANC, help="Orthanc binary (default %(default)s)")
    parser.add_argument("--plugin", type=Path, default=PLUGIN, help="DICOMweb plugin (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the unexplained differences and the report here")
    args = parser.parse_args(argv)

    for what, path in (("Orthanc", args.orthanc), ("the Orthanc DICOMweb plugin", args.plugin)):
        if not path.is_file():
            print(f"parity not run: {what} is not installed ({path})", file=sys.stderr)
            return 2
    files = args.files or None
    if files is None:
        from dicomweb.parity import manifest_files

        if not (args.dataset / "manifest.csv").is_file():
            print(f"parity not run: no manifest.csv in {args.dataset}", file=sys.stderr)
            return 2
        files = list(manifest_files(args.dataset))

    workdir = Path(tempfile.mkdtemp(prefix="dicomweb-parity-"))
    # Registered before the embedded PostgreSQL starts, so it runs after that server's
    # own exit handler has stopped it (atexit runs last-registered first).
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    report = compare_with_orthanc(files, workdir, args.orthanc, args.plugin)
    print(report.format(args.dataset))
    unexplained = report.unexplained()
    if args.json:
        args.json.write_text(json.dumps({"unexplained": unexplained, "report": report.format(args.dataset)}, indent=2))
    return 1 if unexplained else 0


def compare_with_orthanc(files: list[Path], workdir: Path, orthanc: Path, plugin: Path):
    """Start both servers under `workdir`, run the parity, stop them; the Report."""
    home = workdir / "precedent"
    os.environ.update(
        PRECEDENT_HOME=str(home),
        DJANGO_SETTINGS_MODULE="precedent.settings.dev",
        DJANGO_DEBUG="false",
        PRECEDENT_FSYNC="false",
        PRECEDENT_LOG_LEVEL="WARNING",
    )
    os.environ.pop("DATABASE_URL", None)  # a fresh embedded database, never an existing one
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections
    from rest_framework.authtoken.models import Token

    from dicomweb.parity import Endpoint, run_parity
    from precedent.db import connection_url
    from studies import bench

    call_command("migrate", "--noinput", verbosity=0)
    from access.services import role_grant

    parity_user = get_user_model().objects.create_user(username="dicomweb-parity")
    role_grant(user=parity_user, roles=["integrator"])  # STOW, QIDO and WADO (access/policy.py)
    token = Token.objects.create(user=parity_user).key
    auth = {"Authorization": f"Token {token}"}
    with ExitStack() as stack:
        port = bench.free_port()
        gunicorn = bench.ServerProcess(
            "gunicorn",
            [sys.executable, "-m", "gunicorn", "--chdir", str(REPO_ROOT / "platform"), "--bind", f"127.0.0.1:{port}",
             "--workers", "2", "--timeout", "300", "--log-level", "warning", "precedent.wsgi:application"],
            port=port,
            ready_path="/dicomweb/studies",
            ready_headers=auth,
            log_path=workdir / "gunicorn.log",
            env={**os.environ, "DATABASE_URL": connection_url(), "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost"},
        )  # fmt: skip
        stack.enter_context(gunicorn)
        orthanc_dir = workdir / "orthanc"
        orthanc_dir.mkdir()
        orthanc_port = bench.free_port()
        config = {
            **bench.orthanc_config(orthanc_dir, orthanc_port),
            "Name": "precedent-parity",
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        (orthanc_dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        stack.enter_context(
            bench.ServerProcess(
                "Orthanc",
                [str(orthanc), str(orthanc_dir / "orthanc.json")],
                port=orthanc_port,
                ready_path="/dicom-web/studies",
                log_path=orthanc_dir / "orthanc.log",
            )
        )
        version = bench.orthanc_version(orthanc_port)
        report = run_parity(
            files,
            Endpoint("Precedent", f"http://127.0.0.1:{port}/dicomweb", auth),
            Endpoint(f"Orthanc {version}", f"http://127.0.0.1:{orthanc_port}/dicom-web"),
        )
    connections.close_all()
    return report


if __name__ == "__main__":
    sys.exit(main())
