"""Whole objects by URL: a local path or `s3://bucket/key`, read, written and listed the same way.

S3 goes through boto3, configured the standard way: the endpoint from AWS_ENDPOINT_URL (MinIO, Ceph, a GCS S3 API,
the tests' local server), credentials from boto3's usual chain (environment, ~/.aws, instance roles); nothing of it
is ever in a config or a log line. Object stores fail in passing as a matter of course, so:
- boto3's own retries (its "standard" mode: connection errors, 5xx, SlowDown, throttling) run inside every call, and
  a read that breaks or stalls after its response started is retried here, the whole object again, with backoff;
  both kinds are counted (`retry_count`), and the training metrics report the count;
- what retrying cannot fix is a UserError naming the URL: a missing object or bucket, denied access, a checksum that
  does not match (the index's sha256, or the one `put` stores in the object's metadata).
Downloads go to a temporary name beside the destination and are renamed only when whole and verified
(fastimagenet/common/atomic.py), so processes sharing a cache directory never read a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
import time
from pathlib import Path

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError

INSTALL_HINT = "pip install boto3 (or: pip install 'fastimagenet[s3]')"
ATTEMPTS = 5  # whole-object reads, each with boto3's own retries inside
BOTO_ATTEMPTS = 5  # boto3's attempts per request (its standard retry mode)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a read that stalls this long is retried
_BACKOFF_S = 0.5  # first wait between whole-object attempts; doubled each time, capped, with jitter
_BACKOFF_CAP_S = 8.0
_CHUNK = 1 << 20
_SHA256_KEY = "sha256"  # user metadata key `put` sets and `download` checks

_retries = 0
_retries_lock = threading.Lock()
_clients: dict[int, object] = {}  # per process: a client made before a fork is not used after it
_clients_lock = threading.Lock()


class MissingObject(UserError):
    """No object (or local file) at the URL; the bucket exists."""


def is_remote(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def join(url: str | os.PathLike, name: str) -> str:
    """`name` inside the folder or prefix `url`."""
    return f"{str(url).rstrip('/')}/{name}" if is_remote(url) else str(Path(url) / name)


def retry_count() -> int:
    """Transient errors retried by this process so far (boto3's retries and whole-object re-reads)."""
    return _retries


def _count(retries: int) -> None:
    global _retries
    if retries:
        with _retries_lock:
            _retries += retries


def _counted(response: dict) -> dict:
    """`response`, its boto3 retries counted."""
    _count(response["ResponseMetadata"].get("RetryAttempts", 0))
    return response


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{url}: not an s3://bucket/key URL")
    return bucket, key


def _client():
    pid = os.getpid()
    with _clients_lock:  # the fetch threads' first calls would each make one
        if pid not in _clients:
            _clients[pid] = _new_client()
        return _clients[pid]


def _new_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UserError(f"reading s3:// URLs needs boto3, which is not installed: {INSTALL_HINT}") from None
    config = Config(retries={"max_attempts": BOTO_ATTEMPTS, "mode": "standard"},
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
    # boto3 reads AWS_ENDPOINT_URL and the credential chain itself
    return boto3.session.Session().client("s3", config=config)


def _transient(exc: Exception) -> bool:
    """Errors that another attempt may not meet: broken or stalled connections, 5xx, SlowDown."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


def _permanent_error(exc: Exception, url: str) -> UserError | None:
    """A UserError naming `url` for what no retry fixes, else None."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return UserError(f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         "AWS_PROFILE, or an instance role)")
    if not isinstance(exc, ClientError):
        return None
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return UserError(f"{url}: the bucket does not exist")
    if code in ("NoSuchKey", "404", "NotFound"):
        return MissingObject(f"{url}: no such object")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return UserError(f"{url}: access denied ({code}); check the credentials and the bucket's policy")
    if not _transient(exc):
        return UserError(f"{url}: {code or 'request failed'}: {exc}")
    return None


def _with_retries(url: str, attempt):
    """`attempt()` until it succeeds; transient errors are retried with backoff and counted, others raised as a
    UserError naming `url`."""
    for tries in range(1, ATTEMPTS + 1):
        try:
            return attempt()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below into permanent, transient, and ours
            permanent = _permanent_error(exc, url)
            if permanent is not None:
                raise permanent from None
            if not _transient(exc):
                raise
            if tries == ATTEMPTS:
                raise UserError(f"{url}: still failing after {ATTEMPTS} attempts ({type(exc).__name__}: {exc})") \
                    from None
            _count(1)
            time.sleep(min(_BACKOFF_CAP_S, _BACKOFF_S * 2 ** (tries - 1)) * random.uniform(0.5, 1.0))


def read_bytes(url: str) -> bytes:
    """A whole (small) object: an index, a sidecar."""
    if not is_remote(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{url}: no such file") from None
        except OSError as exc:
            raise UserError(f"{url}: unreadable ({exc})") from None
    bucket, key = _split(url)

    def attempt() -> bytes:
        return _counted(_client().get_object(Bucket=bucket, Key=key))["Body"].read()

    return _with_retries(url, attempt)


def head(url: str) -> tuple[int, str, str | None]:
    """A remote object's (size, ETag, the sha256 `put` stored with it or None)."""
    bucket, key = _split(url)

    def attempt():
        response = _counted(_client().head_object(Bucket=bucket, Key=key))
        return response["ContentLength"], response.get("ETag", ""), response.get("Metadata", {}).get(_SHA256_KEY)

    return _with_retries(url, attempt)


def exists(url: str) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    try:
        head(url)
    except MissingObject:
        return False
    return True


def download(url: str, dest: Path, sha256: str | None = None, size: int | None = None) -> Path:
    """Object (or local file) `url` copied to `dest`, atomically; checked against `sha256` and `size` when given,
    else against the sha256 `put` stored with it, if any. A mismatch is a UserError and leaves no `dest`."""
    with atomic_output(dest) as tmp:
        if is_remote(url):
            bucket, key = _split(url)
            stored = _with_retries(url, lambda: _fetch(bucket, key, tmp))
            sha256 = sha256 or stored
        else:
            try:
                shutil.copyfile(url, tmp)
            except FileNotFoundError:
                raise UserError(f"{url}: no such file") from None
        _check(url, tmp, sha256, size)
    return dest


def _fetch(bucket: str, key: str, tmp: Path) -> str | None:
    """One attempt at the whole object into `tmp` (truncated first); returns the sha256 stored with it, if any."""
    response = _counted(_client().get_object(Bucket=bucket, Key=key))
    with open(tmp, "wb") as out:
        for chunk in response["Body"].iter_chunks(_CHUNK):
            out.write(chunk)
    return response.get("Metadata", {}).get(_SHA256_KEY)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(url: str, path: Path, sha256: str | None, size: int | None) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise UserError(f"{url}: {got:,} bytes where the dataset index says {size:,} (a damaged or replaced "
                        "object; write the dataset again with `fastimagenet convert`)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise UserError(f"{url}: checksum mismatch (sha256 differs from the one recorded when it was written: a "
                        "damaged or replaced object; write the dataset again with `fastimagenet convert`)")


def put_file(path: Path, url: str, sha256: str | None = None) -> None:
    """Local file `path` stored at `url` (an object, with its sha256 in the metadata; or a local file, atomically).
    `sha256`: the file's, when the caller has it already."""
    if not is_remote(url):
        with atomic_output(url) as tmp:
            shutil.copyfile(path, tmp)
        return
    bucket, key = _split(url)
    sha256 = sha256 or file_sha256(path)

    def attempt() -> None:
        # upload_file switches to multipart for large files; the metadata travels with it either way
        _client().upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {_SHA256_KEY: sha256}})

    _with_retries(url, attempt)


def put_bytes(data: bytes, url: str) -> None:
    if not is_remote(url):
        with atomic_output(url) as tmp:
            tmp.write_bytes(data)
        return
    bucket, key = _split(url)
    sha256 = hashlib.sha256(data).hexdigest()
    _with_retries(url, lambda: _client().put_object(Bucket=bucket, Key=key, Body=data,
                                                    Metadata={_SHA256_KEY: sha256}))


def delete(url: str) -> None:
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = _split(url)
    _with_retries(url, lambda: _client().delete_object(Bucket=bucket, Key=key))
