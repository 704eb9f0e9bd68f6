"""One interface over a local directory and an `s3://bucket/prefix`, with atomic writes.

Atomic means a reader never sees a partial object under its final name:
- local: write `name.tmp-<pid>-<rand>` in the same directory, fsync, then os.replace;
- S3: spool to a local temp file, then upload_file, which uses a multipart upload for large
  objects; S3 only makes an object visible when the (multipart) upload completes.

S3 settings come from the standard AWS environment/config (credentials, region,
AWS_ENDPOINT_URL); `endpoint` overrides the endpoint (e.g. a moto server on 127.0.0.1).
Transient errors are retried by botocore (adaptive mode, 10 attempts).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = str(url)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"malformed S3 URL {url!r}: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("NFNET_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client with retries, cached per process. The pid is part of the cache key: a client
    inherited across fork (DataLoader workers fork after the rank read the manifest) shares its pooled
    keep-alive sockets with the parent and its siblings, and their responses interleave (seen as
    bodies cut short and misaligned ranged reads)."""
    return _s3_client(endpoint, os.getpid())


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, pid: int):
    """See s3_client.
    NFNET_S3_MAX_ATTEMPTS (default 10) bounds botocore's own retries per request; the loader's reader
    waits out longer outages itself (pipeline/data/s3io.py, data.s3_retry_s)."""
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("NFNET_S3_MAX_ATTEMPTS", "10"))
    # 32 pooled connections: packing's shard tasks and the loader's workers keep 16 and 8 ranged GETs
    # in flight on one client; botocore's default pool of 10 discards (and re-handshakes) the rest.
    cfg = Config(retries={"max_attempts": attempts, "mode": "adaptive"}, connect_timeout=10, read_timeout=60,
                 max_pool_connections=32)  # fmt: skip
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint(endpoint), config=cfg)


class Store:
    """A root (local dir or s3://bucket/prefix) with relative names below it."""

    def __init__(self, root: str, endpoint: str | None = None):
        self.root = str(root).rstrip("/")
        self.endpoint = endpoint
        self.s3 = is_s3(self.root)
        if self.s3:
            self.bucket, self.prefix = split_s3(self.root)

    def __reduce__(self):  # picklable for worker processes and Ray tasks (no client inside)
        return (Store, (self.root, self.endpoint))

    @property
    def client(self):
        return s3_client(self.endpoint)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _path(self, name: str) -> Path:
        return Path(self.root) / name

    # ---- reading -----------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        if not self.s3:
            return self._path(name).exists()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, name: str) -> bytes:
        if not self.s3:
            return self._path(name).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of `name`; S3: one ranged GET."""
        if not self.s3:
            with open(self._path(name), "rb") as f:
                return os.pread(f.fileno(), length, start)
        # botocore retries a failed request, not a body cut off mid-read (IncompleteReadError is not an
        # OSError, so no task retry catches it either): resume from the bytes already read, 5 tries.
        import time

        got = bytearray()
        for attempt in range(5):
            rng = f"bytes={start + len(got)}-{start + length - 1}"
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=rng)["Body"]
                while len(got) < length and (block := body.read(min(1 << 20, length - len(got)))):
                    got += block
                if len(got) == length:
                    return bytes(got)
                err: Exception = EOFError(f"{self.url(name)}: range {start}+{length} ended after {len(got)} bytes")
            except Exception as e:  # noqa: BLE001 - connection errors of every flavour; ClientErrors re-raised below
                from botocore.exceptions import ClientError

                if isinstance(e, ClientError):
                    raise
                err = e
            time.sleep(0.2 * 2**attempt)
        raise OSError(f"{self.url(name)}: ranged read {start}+{length} failed 5 times: {type(err).__name__}: {err}") from err

    def read_if_exists(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is none: one GET, where exists() + read_bytes()
        is a HEAD and a GET (at every evaluation of every rank, for the manifest and its sidecar)."""
        if not self.s3:
            try:
                return self._path(name).read_bytes()
            except FileNotFoundError:
                return None
        from botocore.exceptions import ClientError

        try:
            return self.read_bytes(name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        if not self.s3:
            with open(self._path(name), "rb") as f:
                yield f
        else:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            try:
                yield body
            finally:
                body.close()

    def list(self, sub: str = "") -> list[str]:
        """Names (relative to the root) of all objects/files below `sub`, sorted."""
        return sorted(self.sizes(sub))

    def sizes(self, sub: str = "") -> dict[str, int]:
        """Name -> size of every object/file below `sub`: one listing (S3: a LIST request per 1,000
        keys), where size() per name costs a HEAD request each."""
        if not self.s3:
            base = self._path(sub) if sub else Path(self.root)
            if not base.exists():
                return {}
            return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*") if p.is_file()}
        prefix = self._key(sub) if sub else (self.prefix + "/" if self.prefix else "")
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                out[key[len(self.prefix) + 1 :] if self.prefix else key] = int(obj["Size"])
        return out

    def size(self, name: str) -> int:
        if not self.s3:
            return self._path(name).stat().st_size
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])

    # ---- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write_atomic(self, name: str) -> Iterator[BinaryIO]:
        """Yields a writable binary file; the object appears under `name` only if the block succeeds."""
        if not self.s3:
            final = self._path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
            return
        with tempfile.NamedTemporaryFile(prefix="nfnet-upload-", suffix=".part") as f:
            yield f
            f.flush()
            f.seek(0)
            # upload_fileobj switches to multipart above 8 MiB; the object exists only once complete.
            self.client.upload_fileobj(f, self.bucket, self._key(name))

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        with self.open_write_atomic(name) as f:
            f.write(data)

    def delete(self, name: str) -> None:
        if not self.s3:
            with contextlib.suppress(FileNotFoundError):
                self._path(name).unlink()
        else:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def delete_tree(self, sub: str) -> None:
        for name in self.list(sub):
            self.delete(name)
        if not self.s3:
            import shutil

            shutil.rmtree(self._path(sub), ignore_errors=True)

    def check_writable(self) -> None:
        """Fail fast with a clear message when OUT cannot be written."""
        probe = f".write-probe-{secrets.token_hex(4)}"
        try:
            self.write_bytes_atomic(probe, b"ok")
            self.delete(probe)
        except Exception as e:  # noqa: BLE001 - turned into one clear message
            raise PermissionError(f"output {self.root} is not writable: {type(e).__name__}: {e}") from e
