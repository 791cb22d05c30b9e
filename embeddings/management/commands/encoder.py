"""python manage.py encoder list | register PATH [--name N] | activate NAME [--wait]
| pool NAME --pooling max --image-size 512 [--name N] | index [NAME] [--json]."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Q
from tqdm import tqdm

from embeddings import encoder as enc
from embeddings import services
from embeddings.models import EncoderVersion


class Command(BaseCommand):
    help = "List encoder versions, register a weights file, or activate a version."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list")
        register = sub.add_parser("register", help="a weights file written by train_encoder (or save_encoder)")
        register.add_argument("path", type=Path)
        register.add_argument("--name", default="")
        activate = sub.add_parser("activate", help="embed the archive with it, then serve it")
        activate.add_argument("name")
        activate.add_argument("--wait", action="store_true", help="do the embedding now instead of in the background")
        pool = sub.add_parser(
            "pool",
            help="a new version with the same weights whose whole-image embeddings pool a larger film's feature map "
            "(max: one lesion can dominate); regions are unchanged",
        )
        pool.add_argument("name")
        pool.add_argument("--pooling", choices=enc.POOLINGS, default="max")
        pool.add_argument(
            "--image-size", type=int, default=512, help="the film's long side for whole images (default 512)"
        )
        pool.add_argument("--new-name", default="", help="default: NAME-<pooling><size>")
        index = sub.add_parser(
            "index",
            help="the search indexes of a version (default: the active one): embeddings in PostgreSQL, the saved "
            "files and whether they match, and the index this process serves (type, size, CPU or GPU)",
        )
        index.add_argument("name", nargs="?", default="")
        index.add_argument("--json", action="store_true", help="one JSON object instead of text")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action == "index":
            self._index(options["name"], as_json=options["json"])
            return
        if action == "register":
            try:
                version = services.encoder_register(path=options["path"], name=options["name"])
            except FileNotFoundError:
                raise CommandError(f"no such file: {options['path']}") from None
            except (enc.EncoderFileError, ValueError) as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"registered {version.name} ({version.architecture}, {version.dim} dims)")
        elif action == "activate":
            version = EncoderVersion.objects.filter(name=options["name"]).first()
            if version is None:
                raise CommandError(f"no encoder version named {options['name']!r}")
            if options["wait"] and version.status == EncoderVersion.Status.READY:
                # The long part, with progress; activation then finds little left to do.
                self._embed(version, options["verbosity"])
            services.encoder_activate(encoder=version, wait=options["wait"])
            version.refresh_from_db()
            self.stdout.write(f"{version.name}: {version.get_status_display()}")
        elif action == "pool":
            source = EncoderVersion.objects.filter(name=options["name"]).first()
            if source is None:
                raise CommandError(f"no encoder version named {options['name']!r}")
            try:
                version = services.encoder_pooled(
                    encoder=source,
                    image_pooling=options["pooling"],
                    image_size=options["image_size"],
                    name=options["new_name"],
                )
            except (enc.EncoderFileError, ValueError) as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(
                f"registered {version.name}: weights of {source.name}, whole images at {options['image_size']} px "
                f"with {options['pooling']} pooling; `encoder activate {version.name}` to serve it"
            )
        self._list()

    def _index(self, name: str, *, as_json: bool) -> None:
        if name:
            version = EncoderVersion.objects.filter(name=name).first()
            if version is None:
                raise CommandError(f"no encoder version named {name!r}")
        else:
            version = EncoderVersion.objects.filter(status=EncoderVersion.Status.ACTIVE).first()
            if version is None:
                raise CommandError("no encoder is active (name a version)")
        statuses = [services.index_status(version, kind) for kind in ("image", "region")]
        if as_json:
            self.stdout.write(json.dumps({"encoder": version.name, "status": version.status, "indexes": statuses}))
            return
        self.stdout.write(f"{version.name} ({version.get_status_display()})")
        for row in statuses:
            saved, serving = row["saved"], row["serving"]
            if "error" in saved:
                files = f"no usable saved index ({saved['error']})"
            else:
                if not saved["file_intact"]:
                    agreement = "index file damaged or missing: rebuilt on load"
                elif saved["matches_database"]:
                    agreement = "matches PostgreSQL"
                else:
                    agreement = "stale: caught up on load"
                files = f"saved {saved['created_at']}: {saved['count']} vectors, {saved['index_type']}, {agreement}"
            where = serving["searches_on"].upper()
            if where == "CPU" and serving["gpu_setting"] != "off" and not serving["faiss_sees_gpu"]:
                where += " (faiss sees no GPU)"
            self.stdout.write(
                f"  {row['kind']:6} {row['embeddings']} embeddings in PostgreSQL; {files}; serving "
                f"{serving['count']} vectors ({serving['index_type']}, {serving['tombstones']} tombstones, "
                f"{serving['memory_bytes'] / 2**20:.1f} MiB), searches on the {where} "
                f"(PRECEDENT_INDEX_GPU={serving['gpu_setting']})"
            )

    def _embed(self, version: EncoderVersion, verbosity: int) -> None:
        total = services.pending_instances(version).count()
        with tqdm(total=total, desc=f"embed {version.name}", unit="img", disable=verbosity == 0) as bar:
            services.embed_pending(encoder=version, progress=lambda done, _total: bar.update(done - bar.n))

    def _list(self) -> None:
        versions = EncoderVersion.objects.annotate(
            images=Count("embeddings", filter=Q(embeddings__kind="image")),
            regions=Count("embeddings", filter=Q(embeddings__kind="region")),
        )
        for v in versions:
            metrics = v.metadata.get("metrics") or {}
            extra = ", ".join(f"{k} {val:.3f}" for k, val in metrics.items() if isinstance(val, float))
            self.stdout.write(
                f"{v.name:40} {v.status:10} {v.architecture:12} d={v.dim:<4} {v.images} images, "
                f"{v.regions} regions; cohort {v.metadata.get('cohort') or '-'}{'; ' + extra if extra else ''}"
            )
