"""Integration tests against a real running server (started by `make itest`).

Each test module gets its own database with the extension created, so tests never see each
other's tables. RSCLIP_TEST_URI names the server, RSCLIP_TEST_PG its major version.
"""
import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

URI = os.environ.get("RSCLIP_TEST_URI")
PG_MAJOR = os.environ.get("RSCLIP_TEST_PG", "18")


def pytest_sessionstart(session):
    if not URI:
        raise pytest.UsageError("RSCLIP_TEST_URI is not set: run the integration tests with `make itest`")


def uri_for(dbname: str) -> str:
    base, _, _ = URI.rpartition("/")
    return f"{base}/{dbname}"


def pg_bindir() -> Path:
    pg_config = os.environ["PG18_CONFIG" if PG_MAJOR == "18" else "PG15_CONFIG"]
    return Path(subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True).stdout.strip())


def pgvector_available(conn) -> bool:
    return conn.execute("SELECT count(*) > 0 FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]


@pytest.fixture(scope="module")
def dbname():
    name = f"itest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(URI, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(uri_for(name), autocommit=True) as c:
        c.execute("CREATE EXTENSION rsclip")
    yield name
    with psycopg.connect(URI, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        yield c
