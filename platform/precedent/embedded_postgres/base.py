"""Django's PostgreSQL backend, with the embedded server started before connecting."""

from pathlib import Path

from django.db.backends.postgresql import base

from .server import ensure_server


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self):
        params = super().get_connection_params()
        options = self.settings_dict.get("OPTIONS", {})
        # Always start/join with the main database name: pytest-django connects to
        # "test_<name>" and "postgres", which the server creates or has already.
        socket_dir = ensure_server(Path(options["pgdata"]), options["main_database"])
        params["host"] = str(socket_dir)
        params.pop("pgdata", None)
        params.pop("main_database", None)
        return params
