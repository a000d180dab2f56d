"""Whole states in an S3-compatible object store, behind a small class another store could replace.

Where: ``s3://bucket/prefix`` (the ``objects`` parameter of a Postgres location). The endpoint and
the credentials come from the standard AWS environment variables, read by boto3:

- ``AWS_ENDPOINT_URL``: the store's address (e.g. ``http://seaweedfs:8333``); unset: AWS S3 itself;
- ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``: the credentials;
- ``AWS_REGION``: the region (``us-east-1`` when unset).

boto3 blocks, so every call runs in a worker thread (``asyncio.to_thread``). Errors come back as
:class:`StoreError` in one line naming the bucket and what failed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from chat.errors import StoreError

__all__ = ["ObjectStore", "StoredObject", "parse_objects_url"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class StoredObject:
    """One object of a listing: its key and when it was written (a time)."""

    key: str
    written_at: float


def parse_objects_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``; the prefix is empty or ends with ``/``."""
    if not url.startswith("s3://"):
        raise StoreError(f"the object store must be named s3://bucket/prefix, not {url!r}", "cannot-open")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise StoreError(f"the object store {url!r} names no bucket: use s3://bucket/prefix", "cannot-open")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class ObjectStore:
    """Objects under one prefix of one bucket: put, get, delete, list. Keys given to its methods
    are relative to the prefix."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, self.prefix = parse_objects_url(url)
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise StoreError(
                    "the Postgres backend needs boto3 for its object store: "
                    "pip install 'rwkv-discord[cluster]'",
                    "cannot-open",
                ) from exc
            self._client = boto3.client(
                "s3",
                region_name=os.environ.get("AWS_REGION") or "us-east-1",
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5),
            )
        return self._client

    async def _call(self, doing: str, call: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(call)
        except StoreError:
            raise
        except Exception as exc:
            raise _object_error(exc, self.url, doing) from exc

    async def check(self) -> None:
        """Raise :class:`StoreError` unless the bucket can be reached."""
        await self._call("reaching the bucket", lambda: self._s3().head_bucket(Bucket=self.bucket))

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (whole, or not at all)."""
        await self._call(
            f"storing {key}",
            lambda: self._s3().put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data),
        )

    async def get(self, key: str) -> bytes | None:
        """The bytes stored under ``key``; None when there is no such object."""

        def read() -> bytes | None:
            try:
                response = self._s3().get_object(Bucket=self.bucket, Key=self.prefix + key)
            except Exception as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            body: bytes = response["Body"].read()
            return body

        return await self._call(f"reading {key}", read)

    async def delete(self, keys: list[str]) -> None:
        """Delete the objects under ``keys`` (those already gone are no error)."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            await self._call(
                f"deleting {len(batch)} objects",
                lambda batch=batch: self._s3().delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    async def listing(self, under: str) -> list[list[StoredObject]]:
        """The objects whose keys start with ``under``, in pages of up to 1000."""

        def walk() -> list[list[StoredObject]]:
            pages = []
            paginator = self._s3().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under):
                found = []
                for item in page.get("Contents", []):
                    written: datetime = item["LastModified"]
                    found.append(StoredObject(str(item["Key"])[len(self.prefix) :], written.timestamp()))
                pages.append(found)
            return pages

        return await self._call(f"listing {under}", walk)

    def close(self) -> None:
        """Let go of the client's connections."""
        if self._client is not None:
            self._client.close()
            self._client = None


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _object_error(exc: Exception, url: str, doing: str) -> StoreError:
    """One clear line for an object-store error."""
    code = _code(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if code in ("NoSuchBucket", "404") or "NoSuchBucket" in str(exc):
        return StoreError(
            f"the object store {url} at {endpoint}: the bucket does not exist ({doing} failed): create it",
            "cannot-open",
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StoreError(
            f"the object store {url} at {endpoint} refused the credentials ({doing} failed: {code}): check "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            "cannot-open",
        )
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return StoreError(
            f"cannot reach the object store at {endpoint} ({doing} failed): is it running, and does "
            "AWS_ENDPOINT_URL name it?",
            "unreachable",  # a store starting or restarting: may pass
        )
    if code == "NoCredentialsError" or type(exc).__name__ == "NoCredentialsError":
        return StoreError(
            f"no credentials for the object store {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            "cannot-open",
        )
    return StoreError(f"the object store {url} at {endpoint}: {doing} failed: {exc}")
