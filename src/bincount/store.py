"""One object-store interface over local directories and S3 (MinIO, AWS, any S3 mirror).

Every stage reads and writes through a `Store` rooted at a URI: a local path or `s3://bucket[/prefix]`.
Keys are `/`-separated strings relative to that root. Writes are atomic (a local write goes to a temporary
file that is renamed into place; an S3 object appears whole with its single PUT or completed multipart
upload), so a reader never sees half an object, whatever happens to the writer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from bincount.errors import BincountError

T = TypeVar("T")

PART_SUFFIX = ".part"
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
STREAM_CHUNK = 1 << 20
MULTIPART_SIZE = 16 << 20


class StoreError(BincountError):
    """Any store failure; the subclasses name the ones users can fix."""


class EndpointUnreachableError(StoreError):
    pass


class CredentialsError(StoreError):
    pass


class BucketNotFoundError(StoreError):
    pass


class KeyNotFoundError(StoreError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float | None = None               # POSIX time of the last write, where the listing says


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for one S3 endpoint; `from_env` reads the variables DESIGN.md names."""

    endpoint: str = "s3.amazonaws.com"
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = True
    region: str = "us-east-1"

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        endpoint = env.get("S3_ENDPOINT") or "s3.amazonaws.com"
        secure_default = "1" if endpoint.endswith("amazonaws.com") else "0"
        return cls(
            endpoint=_strip_scheme(endpoint),
            access_key=_env_or_file("AWS_ACCESS_KEY_ID"),
            secret_key=_env_or_file("AWS_SECRET_ACCESS_KEY"),
            secure=env.get("S3_SECURE", secure_default).strip().lower() in ("1", "true", "yes"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def _env_or_file(name: str) -> str | None:
    """`NAME`, or the contents of the file `NAME_FILE` names: pods mount the S3 Secret as files rather than put it
    in their environment (MinIO's own `_FILE` convention)."""
    path = os.environ.get(f"{name}_FILE")
    if path and not os.environ.get(name):
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise CredentialsError(f"cannot read {name} from {path} (${name}_FILE): {e.strerror}") from None
    return os.environ.get(name) or None


def _strip_scheme(endpoint: str) -> str:
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):].rstrip("/")
    return endpoint.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store:
    """Interface shared by `LocalStore` and `S3Store`."""

    uri: str

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    @contextlib.contextmanager
    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        """Stream bytes [offset, offset + length) of an object (to its end without `length`), not held in memory:
        a shard reader starts at any sample with one ranged GET."""
        raise NotImplementedError
        yield

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file, streamed, atomically."""
        raise NotImplementedError

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to a local file, streamed; the file appears only when complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src, _atomic_local_file(path) as dst:
            shutil.copyfileobj(src, dst, STREAM_CHUNK)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except KeyNotFoundError:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix` (recursive), in key order."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def check(self, write: bool = False) -> None:
        """Fail early with a clear error when the store cannot be used (no bucket, bad keys, no endpoint)."""
        raise NotImplementedError

    def remove_stale_parts(self, prefix: str = "") -> int:
        """Delete temporary files of killed writers; S3 has none (an object appears whole or not at all)."""
        return 0

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def get_text(self, key: str) -> str:
        return self.get(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put(key, text.encode("utf-8"))


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.open(key) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    @contextlib.contextmanager
    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFoundError(f"no object {key!r} in {self.uri}") from None
        with f:
            f.seek(offset)
            yield f if length is None else _Window(f, length)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_local_file(path) as f:
            f.write(data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src, _atomic_local_file(dest) as dst:
            shutil.copyfileobj(src, dst, STREAM_CHUNK)

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise KeyNotFoundError(f"no object {key!r} in {self.uri}")
        return ObjectInfo(key, path.stat().st_size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") and name.endswith(PART_SUFFIX):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                info = os.stat(full)
                found.append(ObjectInfo(key, info.st_size, info.st_mtime))
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def check(self, write: bool = False) -> None:
        if write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from None
            if not os.access(self.root, os.W_OK):
                raise StoreError(f"store directory {self.root} is not writable")
        elif not self.root.is_dir():
            raise StoreError(f"store directory {self.root} does not exist")

    def remove_stale_parts(self, prefix: str = "") -> int:
        """Delete temporary files left by writers that were killed; returns how many."""
        base = self._path(prefix) if prefix else self.root
        removed = 0
        for part in base.rglob(f".*{PART_SUFFIX}") if base.is_dir() else []:
            pid = _part_owner(part.name)
            if pid is None or not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                    removed += 1
        return removed


def _part_owner(name: str) -> int | None:
    try:
        return int(name[: -len(PART_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Window(io.RawIOBase):
    """At most `length` bytes of a file, from where it stands: a local ranged read ends where S3's would."""

    def __init__(self, f: BinaryIO, length: int):
        self.f, self.left = f, length

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[:min(len(buf), self.left)]) if self.left else 0
        self.left -= n
        return n


@contextlib.contextmanager
def _atomic_local_file(path: Path) -> Iterator[BinaryIO]:
    """Write to `.name.<pid>.<rand>.part` beside `path`, rename into place; remove it on error.

    The rename makes the write atomic for readers and for a writer that is killed. There is no fsync: it cost
    six times the rest of a small write (bulk ingest and generation write thousands). Durability across a
    power cut is left to the filesystem; a file cut short there is seen by ingest's size check and copied again.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


TRANSIENT_S3_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "OperationAborted"}
)
CREDENTIAL_S3_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
)


class S3Store(Store):
    """A bucket (and optional prefix) on an S3 endpoint, through the minio SDK.

    minio's own urllib3 retries are turned off so that `retrying` decides alone: transient failures
    (connection errors, 5xx, SlowDown) are retried with jittered exponential backoff; everything else
    (missing key, bad credentials) fails at once with its own message.
    """

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None,
                 attempts: int = 4, backoff_s: float = 0.25, timeout_s: float = 30.0):
        import certifi
        import urllib3
        from minio import Minio

        self.settings = settings or S3Settings.from_env()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
            maxsize=64,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self.client = Minio(
            self.settings.endpoint,
            access_key=self.settings.access_key,
            secret_key=self.settings.secret_key,
            secure=self.settings.secure,
            region=self.settings.region,
            http_client=http,
        )

    def _name(self, key: str) -> str:
        return join(self.prefix, key)

    def _where(self) -> str:
        scheme = "https" if self.settings.secure else "http"
        return f"{scheme}://{self.settings.endpoint}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one S3 request, retrying transient errors with jittered exponential backoff."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt == self.attempts or not _is_transient(e):
                    raise self._error(e, what, key, attempt) from None
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))

    def _error(self, e: Exception, what: str, key: str | None, attempts: int) -> Exception:
        from minio.error import InvalidResponseError, S3Error, ServerError

        if isinstance(e, S3Error):
            return self._translate(e, key)
        if isinstance(e, ServerError):
            return StoreError(f"S3 endpoint {self._where()} failed to {what} after {attempts} attempts "
                              f"(HTTP {e.status_code})")
        if isinstance(e, InvalidResponseError) and getattr(e, "_code", None) in (401, 403):
            return self._denied("AccessDenied")
        if isinstance(e, InvalidResponseError):
            return StoreError(f"{self._where()} did not answer like an S3 server when asked to {what}: {e}")
        if _is_transient(e):
            return EndpointUnreachableError(f"cannot reach S3 endpoint {self._where()} ({_reason(e)}); "
                                            "check S3_ENDPOINT and S3_SECURE")
        return e

    def _translate(self, e, key: str | None) -> StoreError:
        if e.code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {self.bucket!r} does not exist on {self._where()}")
        if e.code in ("NoSuchKey", "ResourceNotFound"):
            if not self._bucket_exists_quiet():
                return BucketNotFoundError(f"bucket {self.bucket!r} does not exist on {self._where()}")
            return KeyNotFoundError(f"no object {key!r} in {self.uri}")
        if e.code in CREDENTIAL_S3_CODES:
            return self._denied(e.code)
        return StoreError(f"S3 error on {self.uri}/{key or ''}: {e.code}: {e.message}")

    def _denied(self, code: str) -> CredentialsError:
        who = (f"access key {self.settings.access_key!r}" if self.settings.access_key
               else "anonymous access (no AWS_ACCESS_KEY_ID set)")
        return CredentialsError(f"S3 endpoint {self._where()} refused {who} for bucket {self.bucket!r} ({code}); "
                                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")

    def _bucket_exists_quiet(self) -> bool:
        try:
            return self.client.bucket_exists(self.bucket)
        except Exception:
            return True

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        def fetch() -> bytes:
            resp = self.client.get_object(self.bucket, self._name(key), offset=offset, length=length or 0)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call("read", key, fetch)

    @contextlib.contextmanager
    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        resp = self._call("read", key, lambda: self.client.get_object(self.bucket, self._name(key), offset=offset,
                                                                      length=length or 0))
        try:
            yield resp
        finally:
            resp.close()
            resp.release_conn()

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self.client.put_object(
            self.bucket, self._name(key), io.BytesIO(data), len(data)))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self._call("write", key, lambda: self.client.fput_object(
            self.bucket, self._name(key), os.fspath(path), part_size=MULTIPART_SIZE))

    def stat(self, key: str) -> ObjectInfo:
        obj = self._call("stat", key, lambda: self.client.stat_object(self.bucket, self._name(key)))
        return ObjectInfo(key, obj.size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Streams page by page; after a transient failure it lists again after the last key seen."""
        name_prefix = self._name(prefix)
        if name_prefix and prefix.endswith("/"):
            name_prefix += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        last: str | None = None
        failures = 0
        while True:
            try:
                for obj in self.client.list_objects(self.bucket, prefix=name_prefix or None, recursive=True,
                                                    start_after=last):
                    last, failures = obj.object_name, 0
                    if not obj.is_dir:
                        modified = obj.last_modified.timestamp() if obj.last_modified else None
                        yield ObjectInfo(obj.object_name[strip:], obj.size, modified)
                return
            except Exception as e:
                failures += 1
                if failures == self.attempts or not _is_transient(e):
                    raise self._error(e, "list", prefix, failures) from None
                self._sleep(failures)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, self._name(key)))

    def check(self, write: bool = False) -> None:
        exists = self._call("check", None, lambda: self.client.bucket_exists(self.bucket))
        if not exists:
            raise BucketNotFoundError(f"bucket {self.bucket!r} does not exist on {self._where()}")


def _is_transient(e: Exception) -> bool:
    from minio.error import S3Error, ServerError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(e, S3Error):
        return e.code in TRANSIENT_S3_CODES
    return isinstance(e, (ServerError, Urllib3Error, ConnectionError, TimeoutError))


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    text = str(reason)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "Temporary failure in name resolution", "certificate verify failed", "WRONG_VERSION_NUMBER"):
        if marker in text:
            return marker
    if isinstance(reason, OSError) and reason.errno:
        return errno.errorcode.get(reason.errno, text)
    return text.split(": ", 1)[-1][:200]


def open_store(uri: str, settings: S3Settings | None = None) -> Store:
    """`s3://bucket[/prefix]` → S3Store (settings from env unless given); anything else is a local path."""
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket; expected s3://bucket[/prefix]")
        if not BUCKET_RE.match(bucket):
            raise StoreError(f"{bucket!r} in {uri!r} is not a valid S3 bucket name "
                             "(3-63 lowercase letters, digits, '.' or '-')")
        return S3Store(bucket, prefix, settings)
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use a local path or s3://bucket[/prefix]")
    return LocalStore(uri)
