"""`manage.py api_token create USER [--scope S ...]` prints a new key; `api_token revoke USER`.

Without --scope the token acts with all of the user's role permissions (as one from
`drf_create_token`); with scopes, only with those the roles also grant, and on
DICOMweb only with --scope dicomweb.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from access import policy
from access.models import Via
from access.services import AccessError, api_token_create, api_token_revoke, audit_record

from .roles import get_user


class Command(BaseCommand):
    help = "Create (printing its key) or revoke a user's API token, optionally limited to scopes."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="a new token (replaces the user's previous one)")
        create.add_argument("username")
        create.add_argument(
            "--scope",
            action="append",
            default=[],
            choices=list(policy.TOKEN_SCOPES),
            help="limit the token to this permission or channel (repeatable)",
        )
        revoke = sub.add_parser("revoke", help="delete the user's token")
        revoke.add_argument("username")

    def handle(self, *args, action: str, username: str, **options) -> None:
        user = get_user(username)
        if action == "revoke":
            if not api_token_revoke(user=user):
                raise CommandError(f"{username} has no token")
            audit_record(action="token-revoke", via=Via.COMMAND, target_type="user", target=username)
            self.stderr.write(f"revoked the token of {username}")
            return
        scopes = options["scope"]
        try:
            token = api_token_create(user=user, scopes=scopes)
        except AccessError as error:
            raise CommandError(str(error))
        audit_record(
            action="token-create",
            via=Via.COMMAND,
            target_type="user",
            target=username,
            details={"scopes": sorted(set(scopes))},
        )
        self.stderr.write(f"token for {username}, scopes: {', '.join(sorted(set(scopes))) or 'all of its roles'}")
        self.stdout.write(token.key)
