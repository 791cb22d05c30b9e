"""A Django database backend that starts an embedded PostgreSQL (pgserver) on demand.

Used when DATABASE_URL is unset: the first connection any process makes (a manage.py
command, the web server, pytest) starts the server whose data lives under
PRECEDENT_HOME, and the last process to exit stops it again. The data stays on disk
between runs.
"""
