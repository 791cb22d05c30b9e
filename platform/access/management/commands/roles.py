"""`manage.py roles grant USER ROLE...`, `roles revoke USER ROLE...`, `roles list [USER]`."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from access import policy
from access.models import Via
from access.selectors import user_roles
from access.services import AccessError, audit_record, role_grant, role_revoke


def get_user(username: str):
    User = get_user_model()
    try:
        return User.objects.get(**{User.USERNAME_FIELD: username})
    except User.DoesNotExist:
        raise CommandError(f"no user {username!r}")


class Command(BaseCommand):
    help = "Grant, revoke or list roles (" + ", ".join(policy.ROLES) + ")."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        for name, text in (("grant", "give roles to a user"), ("revoke", "take roles from a user")):
            action = sub.add_parser(name, help=text)
            action.add_argument("username")
            action.add_argument("roles", nargs="+", metavar="ROLE", choices=list(policy.ROLES))
        listing = sub.add_parser("list", help="the roles and what they grant, or one user's roles")
        listing.add_argument("username", nargs="?")

    def handle(self, *args, action: str, **options) -> None:
        if action == "list":
            self.list_roles(options.get("username"))
            return
        user = get_user(options["username"])
        roles = options["roles"]
        try:
            if action == "grant":
                now = role_grant(user=user, roles=roles)
            else:
                now = role_revoke(user=user, roles=roles)
        except AccessError as error:
            raise CommandError(str(error))
        audit_record(
            action=f"role-{action}",
            via=Via.COMMAND,
            target_type="user",
            target=user.get_username(),
            details={"roles": roles, "now": now},
        )
        self.stdout.write(f"{user.get_username()}: {', '.join(now) or '(no roles)'}")

    def list_roles(self, username: str | None) -> None:
        if username:
            user = get_user(username)
            roles = user_roles(user=user)
            permissions = policy.role_permissions(roles, superuser=user.is_superuser)
            extra = " (superuser: every permission)" if user.is_superuser else ""
            self.stdout.write(f"{username}: {', '.join(roles) or '(no roles)'}{extra}")
            self.stdout.write(f"  permissions: {', '.join(sorted(permissions)) or '(none)'}")
            return
        User = get_user_model()
        for role, permissions in policy.ROLES.items():
            members = User.objects.filter(groups__name=role).order_by(User.USERNAME_FIELD)
            names = [member.get_username() for member in members]
            self.stdout.write(f"{role}: {policy.ROLE_DESCRIPTIONS[role]}")
            self.stdout.write(f"  permissions: {', '.join(sorted(permissions))}")
            self.stdout.write(f"  users: {', '.join(names) or '(none)'}")
