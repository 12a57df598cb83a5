"""Uploading a job's outputs to S3-compatible storage and returning presigned URLs.

Used when ``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID`` and ``BUCKET_SECRET_ACCESS_KEY`` are all set
(``Settings.s3_enabled``). boto3 is synchronous, so every call runs in a worker thread; the files of one job
are uploaded concurrently.

Which bucket, and which key (documented in docs/jobs.md, tested in tests/test_storage.py):

1. ``BUCKET_ENDPOINT_URL`` with a path -- ``https://host[:port]/my-bucket[/some/prefix]``: the first path
   segment is the bucket, the rest prefixes every key, and the endpoint is ``https://host[:port]``.
   ``BUCKET_NAME``, if also set, must name the same bucket.
2. otherwise ``BUCKET_NAME``.
3. otherwise a virtual-hosted endpoint -- ``https://my-bucket.s3.<region>.amazonaws.com``,
   ``https://my-bucket.s3.amazonaws.com``, ``https://my-bucket.<region>.digitaloceanspaces.com``,
   ``https://my-bucket.s3.<region>.backblazeb2.com`` (a first label followed by an ``s3``/``s3-<region>``
   label, or a Spaces host): the first label is the bucket and the endpoint is the rest of the host. This is
   the form the official worker's users already have in ``BUCKET_ENDPOINT_URL``.
4. otherwise the job fails with a message saying to set ``BUCKET_NAME``.

Key: ``[<path prefix>/][<BUCKET_PREFIX>/]<job id>/<file name>``. URLs are presigned GETs valid for
``BUCKET_URL_EXPIRY_S`` (7 days at most, the SigV4 limit). Access keys never appear in messages or logs.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from supervisor.config import Settings
from supervisor.errors import StorageError

STORAGE_PREFIX = "Failed to upload outputs to the bucket"
_VHOST_RE = re.compile(r"^(?P<bucket>[^.]+)\.(?P<rest>s3[.-].+|[^.]+\.digitaloceanspaces\.com)$", re.IGNORECASE)
_REGION_RE = re.compile(r"(?:^|\.)s3[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.", re.IGNORECASE)


@dataclass(frozen=True)
class BucketTarget:
    endpoint_url: str
    bucket: str
    prefix: str  # without leading or trailing "/"
    region: str

    def key(self, job_id: str, filename: str) -> str:
        return "/".join(p for p in (self.prefix, safe_key_part(job_id), filename) if p)


def safe_key_part(text: str) -> str:
    """A job id as one key segment: no slashes or control characters, never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9._=-]", "_", text).strip(".") or "job"
    return cleaned[:128]


def bucket_target(settings: Settings) -> BucketTarget:
    """Apply the rule above to the settings; StorageError if the bucket cannot be told."""
    endpoint = (settings.bucket_endpoint_url or "").strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"{STORAGE_PREFIX}: BUCKET_ENDPOINT_URL {endpoint!r} is not an http(s) URL")
    origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    segments = [s for s in parts.path.split("/") if s]
    extra_prefix = [s for s in settings.bucket_prefix.split("/") if s]
    region = settings.bucket_region
    if segments:
        bucket = segments[0]
        if settings.bucket_name and settings.bucket_name != bucket:
            raise StorageError(
                f"{STORAGE_PREFIX}: BUCKET_NAME {settings.bucket_name!r} differs from the bucket "
                f"{bucket!r} in BUCKET_ENDPOINT_URL's path; set one of them"
            )
        return BucketTarget(origin, bucket, "/".join(segments[1:] + extra_prefix), _region(parts.hostname, region))
    if settings.bucket_name:
        return BucketTarget(origin, settings.bucket_name, "/".join(extra_prefix), _region(parts.hostname, region))
    match = _VHOST_RE.match(parts.hostname)
    if match:
        netloc = match["rest"] + (f":{parts.port}" if parts.port else "")
        rest_origin = urlunsplit((parts.scheme, netloc, "", "", ""))
        return BucketTarget(rest_origin, match["bucket"], "/".join(extra_prefix), _region(parts.hostname, region))
    raise StorageError(
        f"{STORAGE_PREFIX}: cannot tell which bucket to use; set BUCKET_NAME, or put the bucket in "
        "BUCKET_ENDPOINT_URL's path (https://host/bucket)"
    )


def _region(host: str, configured: str) -> str:
    """BUCKET_REGION when changed from its default, else the region an AWS-style host names, else us-east-1."""
    if configured and configured != "us-east-1":
        return configured
    match = _REGION_RE.search(host)
    return match["region"] if match else configured or "us-east-1"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes
    content_type: str


class BucketStorage:
    """Puts files into the bucket and presigns GET URLs. One boto3 client per worker, made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def target(self) -> BucketTarget:
        return bucket_target(self.settings)

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3  # imported lazily: ~0.3 s, and only workers with a bucket need it
                from botocore.config import Config

                target = self.target
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=target.endpoint_url,
                    aws_access_key_id=self.settings.bucket_access_key_id,
                    aws_secret_access_key=self.settings.bucket_secret_access_key,
                    region_name=target.region,
                    config=Config(
                        signature_version="s3v4",
                        s3={"addressing_style": "path"},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=10,
                        read_timeout=60,
                    ),
                )
            return self._client

    async def upload_all(self, job_id: str, files: Sequence[Upload]) -> list[str]:
        """Upload every file concurrently; the presigned URLs in the same order. StorageError on any failure."""
        target = self.target
        keys = _unique_keys(target, job_id, [f.filename for f in files])
        client = await asyncio.to_thread(self._get_client)
        results = await asyncio.gather(
            *(asyncio.to_thread(self._put, client, target, key, f) for key, f in zip(keys, files)),
            return_exceptions=True,
        )
        problems = [f"{f.filename}: {r}" for f, r in zip(files, results) if isinstance(r, BaseException)]
        if problems:
            raise StorageError.with_problems(STORAGE_PREFIX, problems, {"bucket": target.bucket, "endpoint": target.endpoint_url})
        return [str(r) for r in results]

    def _put(self, client: Any, target: BucketTarget, key: str, upload: Upload) -> str:
        try:
            client.put_object(Bucket=target.bucket, Key=key, Body=upload.data, ContentType=upload.content_type)
            return client.generate_presigned_url(
                "get_object",
                Params={"Bucket": target.bucket, "Key": key},
                ExpiresIn=self.settings.bucket_url_expiry_s,
            )
        except Exception as exc:  # noqa: BLE001 - botocore's errors are many; the message says which
            raise RuntimeError(_describe(exc, target)) from None

    async def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store one object under ``key`` (below BUCKET_PREFIX); StorageError on failure."""
        target = self.target
        client = await asyncio.to_thread(self._get_client)
        full = "/".join(p for p in (target.prefix, key) if p)
        try:
            await asyncio.to_thread(client.put_object, Bucket=target.bucket, Key=full, Body=data,
                                    ContentType=content_type)
        except Exception as exc:  # noqa: BLE001 - botocore's errors are many; the message says which
            raise StorageError.with_problems(STORAGE_PREFIX, [_describe(exc, target)],
                                             {"bucket": target.bucket, "endpoint": target.endpoint_url}) from None

    async def get_object(self, key: str) -> bytes:
        """The bytes of the object stored under ``key`` by :meth:`put_object`; StorageError on failure."""
        target = self.target
        client = await asyncio.to_thread(self._get_client)
        full = "/".join(p for p in (target.prefix, key) if p)

        def _get() -> bytes:
            return client.get_object(Bucket=target.bucket, Key=full)["Body"].read()

        try:
            return await asyncio.to_thread(_get)
        except Exception as exc:  # noqa: BLE001
            raise StorageError.with_problems(STORAGE_PREFIX, [_describe(exc, target)],
                                             {"bucket": target.bucket, "endpoint": target.endpoint_url}) from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


def _unique_keys(target: BucketTarget, job_id: str, filenames: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    keys = []
    for name in filenames:
        key, n = target.key(job_id, name), 1
        while key in seen:
            stem, dot, ext = name.rpartition(".")
            key = target.key(job_id, f"{stem}_{n}.{ext}" if dot else f"{name}_{n}")
            n += 1
        seen.add(key)
        keys.append(key)
    return keys


def _describe(exc: Exception, target: BucketTarget) -> str:
    """One line for a boto error: the service's code and message, never the request's credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        code, message = err.get("Code", "?"), err.get("Message", "")
        return f"{code}: {message} (bucket {target.bucket!r} at {target.endpoint_url})".replace(": (", " (")
    return f"{type(exc).__name__}: {exc}"
