"""DRF token authentication that reads what the policy needs in the same query.

DRF's TokenAuthentication loads the token and its user (one query); deciding the
request then asked for the token's scopes and the user's roles (two more). Here one
statement brings all of it: the user's columns, the scope row by a LEFT JOIN and the
role names as an array subquery. Every API request pays for this, and building that
statement through the ORM each time cost more than running it, so its SQL is built
once per process from the models' metadata and the rows become model instances with
Django's own `Model.from_db`.
"""

from __future__ import annotations

import functools

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from . import policy
from .models import TokenScope
from .selectors import remember_roles


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, as DRF's, with the user's roles and the token's
    scopes loaded alongside (see access.selectors.user_roles / token_scopes)."""

    def authenticate_credentials(self, key):
        sql, user_fields, token_fields, scope_fields = _token_sql()
        with connection.cursor() as cursor:
            cursor.execute(sql, [list(policy.ROLES), key])
            row = cursor.fetchone()
        if row is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        values, roles = iter(row[:-1]), row[-1]
        user, token, scope = (
            model.from_db(connection.alias, fields, [next(values) for _ in fields])
            for model, fields in ((get_user_model(), user_fields), (Token, token_fields), (TokenScope, scope_fields))
        )
        token.user = user  # the relations are filled: no query when DRF or we follow them
        if scope.token_id is not None:
            token.scope = scope
        else:
            Token.scope.related.set_cached_value(token, None)  # known absent: no query either
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        remember_roles(user, roles)
        return (user, token)


@functools.cache
def _token_sql() -> tuple[str, list[str], list[str], list[str]]:
    """SELECT the user's, the token's and the scope's columns (NULLs without a scope)
    and the user's role group names, for one token key."""
    User = get_user_model()
    q = connection.ops.quote_name
    tables = ((User, "u"), (Token, "t"), (TokenScope, "s"))
    columns = [f"{alias}.{q(f.column)}" for model, alias in tables for f in model._meta.concrete_fields]
    user_fields, token_fields, scope_fields = ([f.attname for f in model._meta.concrete_fields] for model, _ in tables)
    groups = User._meta.get_field("groups")  # the user ↔ group link table and its columns
    link, link_user, link_group = groups.m2m_db_table(), groups.m2m_column_name(), groups.m2m_reverse_name()
    user_pk, group_pk, token_pk = User._meta.pk.column, Group._meta.pk.column, Token._meta.pk.column
    token_user, scope_token = Token._meta.get_field("user").column, TokenScope._meta.get_field("token").column
    sql = (
        f"SELECT {', '.join(columns)}, "
        f"ARRAY(SELECT g.{q('name')} FROM {q(link)} ug JOIN {q(Group._meta.db_table)} g "
        f"ON g.{q(group_pk)} = ug.{q(link_group)} "
        f"WHERE ug.{q(link_user)} = u.{q(user_pk)} AND g.{q('name')} = ANY(%s)) "
        f"FROM {q(Token._meta.db_table)} t "
        f"JOIN {q(User._meta.db_table)} u ON u.{q(user_pk)} = t.{q(token_user)} "
        f"LEFT JOIN {q(TokenScope._meta.db_table)} s ON s.{q(scope_token)} = t.{q(token_pk)} "
        f"WHERE t.{q(token_pk)} = %s"
    )
    return sql, user_fields, token_fields, scope_fields
