"""S3-compatible storage: the bucket/key rule, and real uploads to moto's S3 server whose URLs fetch the bytes."""

from __future__ import annotations

import aiohttp
import pytest

from supervisor.config import Settings
from supervisor.errors import StorageError
from supervisor.jobs.storage import BucketStorage, BucketTarget, Upload, bucket_target
from tests.helpers.jobs import make_bucket, moto_s3_server, png_bytes

SECRET = "very-secret-key-value"


def s3_settings(endpoint: str, **kw) -> Settings:
    return Settings(bucket_endpoint_url=endpoint, bucket_access_key_id="AKIDEXAMPLE",
                    bucket_secret_access_key=SECRET, **kw)


@pytest.mark.parametrize(
    "endpoint, kw, expected",
    [
        ("http://127.0.0.1:9000/outputs", {}, BucketTarget("http://127.0.0.1:9000", "outputs", "", "us-east-1")),
        ("http://127.0.0.1:9000/outputs/a/b/", {"bucket_prefix": "p"},
         BucketTarget("http://127.0.0.1:9000", "outputs", "a/b/p", "us-east-1")),
        ("https://minio.example.com", {"bucket_name": "imgs", "bucket_prefix": "x/y"},
         BucketTarget("https://minio.example.com", "imgs", "x/y", "us-east-1")),
        ("https://my-bucket.s3.eu-west-3.amazonaws.com", {},
         BucketTarget("https://s3.eu-west-3.amazonaws.com", "my-bucket", "", "eu-west-3")),
        ("https://my-bucket.s3.amazonaws.com", {"bucket_region": "ap-south-1"},
         BucketTarget("https://s3.amazonaws.com", "my-bucket", "", "ap-south-1")),
        ("https://my-bucket.s3-us-west-2.amazonaws.com", {},
         BucketTarget("https://s3-us-west-2.amazonaws.com", "my-bucket", "", "us-west-2")),
        ("https://space.fra1.digitaloceanspaces.com", {},
         BucketTarget("https://fra1.digitaloceanspaces.com", "space", "", "us-east-1")),
        ("https://bkt.s3.us-west-004.backblazeb2.com", {},
         BucketTarget("https://s3.us-west-004.backblazeb2.com", "bkt", "", "us-west-004")),
    ],
)
def test_bucket_rule(endpoint: str, kw: dict, expected: BucketTarget) -> None:
    assert bucket_target(s3_settings(endpoint, **kw)) == expected


def test_bucket_rule_refusals() -> None:
    with pytest.raises(StorageError) as info:
        bucket_target(s3_settings("https://acct.r2.cloudflarestorage.com"))
    assert info.value.message == (
        "Failed to upload outputs to the bucket: cannot tell which bucket to use; set BUCKET_NAME, or put the "
        "bucket in BUCKET_ENDPOINT_URL's path (https://host/bucket)"
    )
    with pytest.raises(StorageError) as info:
        bucket_target(s3_settings("http://h:1/a", bucket_name="b"))
    assert info.value.message == (
        "Failed to upload outputs to the bucket: BUCKET_NAME 'b' differs from the bucket 'a' in "
        "BUCKET_ENDPOINT_URL's path; set one of them"
    )


def test_keys() -> None:
    target = BucketTarget("http://h", "b", "pre/fix", "us-east-1")
    assert target.key("job-1", "ComfyUI_00001_.png") == "pre/fix/job-1/ComfyUI_00001_.png"
    assert target.key("../evil/id", "a.png") == "pre/fix/_evil_id/a.png"


async def test_uploads_to_a_real_s3_server_and_urls_fetch_the_same_bytes() -> None:
    files = [Upload("a.png", png_bytes((1, 2, 3)), "image/png"), Upload("b.webp", png_bytes(fmt="WEBP"), "image/webp"),
             Upload("a.png", png_bytes((9, 9, 9)), "image/png")]
    with moto_s3_server() as endpoint:
        make_bucket(endpoint, "outputs")
        storage = BucketStorage(s3_settings(endpoint + "/outputs", bucket_prefix="runs"))
        try:
            urls = await storage.upload_all("job-42", files)
        finally:
            await storage.close()
        assert [u.split("?")[0] for u in urls] == [
            f"{endpoint}/outputs/runs/job-42/a.png",
            f"{endpoint}/outputs/runs/job-42/b.webp",
            f"{endpoint}/outputs/runs/job-42/a_1.png",
        ]
        assert all("X-Amz-Signature=" in u and "X-Amz-Expires=604800" in u for u in urls)
        async with aiohttp.ClientSession() as session:
            for url, f in zip(urls, files):
                async with session.get(url) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == f.content_type
                    assert await resp.read() == f.data


async def test_upload_failure_is_a_storage_error_without_secrets() -> None:
    with moto_s3_server() as endpoint:
        storage = BucketStorage(s3_settings(endpoint + "/missing-bucket"))
        try:
            with pytest.raises(StorageError) as info:
                await storage.upload_all("j", [Upload("a.png", b"x", "image/png")])
        finally:
            await storage.close()
    assert info.value.message == (
        "Failed to upload outputs to the bucket: a.png: NoSuchBucket: The specified bucket does not exist "
        f"(bucket 'missing-bucket' at {endpoint})"
    )
    assert SECRET not in info.value.describe() and SECRET not in repr(info.value.details)
