#!/usr/bin/env python3
"""Start, stop or describe a local PostgreSQL cluster for rsclip (development, demo, tests).

The cluster lives in $RSCLIP_LOCAL/data/<name>-pg<major>, runs as the unprivileged $PG_USER,
listens on 127.0.0.1 only (no Unix socket), and trusts local connections: it is a developer
sandbox, not a deployment. `start` is idempotent and prints the libpq URI as its last line.

    cluster.py start --pg 18 --name server --port 5418 [--set name=value ...]
    cluster.py stop  --pg 18 --name server
    cluster.py uri   --pg 18 --name server
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOCAL = Path(os.environ["RSCLIP_LOCAL"])
PG_USER = os.environ.get("PG_USER", "postgres")


def pg_config(major: str) -> Path:
    return Path(os.environ[{"18": "PG18_CONFIG", "15": "PG15_CONFIG"}[major]])


def bindir(major: str) -> Path:
    out = subprocess.run([str(pg_config(major)), "--bindir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def as_pg_user(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["sudo", "-n", "-u", PG_USER, "--"] + cmd
    return subprocess.run(cmd, cwd="/", **kw)


def preload_line(conf_text: str) -> str:
    """The shared_preload_libraries line of an rsclip.conf: a change needs a restart."""
    return next((l for l in conf_text.splitlines() if l.startswith("shared_preload_libraries")), "")


class Cluster:
    def __init__(self, major: str, name: str, port: int):
        self.major, self.name, self.port = major, name, port
        self.data = LOCAL / "data" / f"{name}-pg{major}"
        self.bin = bindir(major)
        self.log = self.data / "server.log"

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialized():
            return False
        r = as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True)
        return r.returncode == 0

    def init(self, settings):
        self.data.parent.mkdir(parents=True, exist_ok=True)
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(self.data, PG_USER, PG_USER)
        r = as_pg_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                       capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"initdb failed:\n{r.stdout}\n{r.stderr}")


    def configure(self, settings):
        """(Re)writes rsclip.conf, included from postgresql.conf: our settings in one place."""
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "shared_buffers": "'512MB'",
            "max_wal_size": "'4GB'",
            # The planner hook that lets ORDER BY rsclip_score(...) DESC use the index must be in
            # place from a backend's first query (README: "Query forms").
            "shared_preload_libraries": "'rsclip'",
            "rsclip.model_path": f"'{LOCAL / 'models' / 'tiny-siglip'}'",
            "rsclip.onnxruntime_library": f"'{os.environ['RSCLIP_ONNXRUNTIME_LIBRARY']}'",
        }
        for item in settings:
            k, _, v = item.partition("=")
            conf[k.strip()] = v.strip()
        text = "# written by tools/cluster.py\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
        old = as_pg_user(["cat", f"{self.data}/rsclip.conf"], capture_output=True, text=True).stdout
        as_pg_user(["sh", "-c", f"cat > '{self.data}/rsclip.conf'"], input=text.encode(), check=True)
        include = "include_if_exists 'rsclip.conf'"
        conf_file = self.data / "postgresql.conf"
        has = as_pg_user(["grep", "-qxF", include, str(conf_file)]).returncode == 0
        if not has:
            as_pg_user(["sh", "-c", f"echo \"{include}\" >> '{conf_file}'"], check=True)
        return preload_line(old) != preload_line(text)

    def start(self, settings):
        if not self.initialized():
            self.init(settings)
        needs_restart = self.configure(settings)
        if self.running():
            action = "restart" if needs_restart else "reload"
            extra = ["-w", "-l", str(self.log)] if needs_restart else []
            as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), *extra, action], check=True, capture_output=True)
            return
        # A port still held by a socket that is going away (or taken a moment by another
        # program) makes the start fail; try again a few times before giving up.
        for attempt in range(5):
            r = as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                            "-w", "-t", "60", "start"], capture_output=True, text=True)
            if r.returncode == 0:
                return
            tail = as_pg_user(["tail", "-n", "30", str(self.log)], capture_output=True, text=True).stdout
            if "Address already in use" not in tail:
                break
            time.sleep(2)
        sys.exit(f"could not start {self.name}-pg{self.major}:\n{r.stdout}{r.stderr}\n{tail}")

    def stop(self, mode="fast"):
        if self.running():
            as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "uri", "status"])
    ap.add_argument("--pg", default="18", choices=["18", "15"])
    ap.add_argument("--name", default="server")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="extra postgresql.conf setting name=value")
    a = ap.parse_args()
    port = a.port or (5400 + int(a.pg))
    c = Cluster(a.pg, a.name, port)
    if a.action == "start":
        c.start(a.set)
        print(f"PostgreSQL {a.pg} cluster '{a.name}' running from {c.data} (log: {c.log})")
        print(c.uri)
    elif a.action == "stop":
        c.stop()
        print(f"stopped {a.name}-pg{a.pg}")
    elif a.action == "status":
        print("running" if c.running() else "stopped")
    else:
        print(c.uri)


if __name__ == "__main__":
    main()
