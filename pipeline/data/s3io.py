"""An `s3://` opener for webdataset: boto3 streaming GETs, resumed with Range on transient errors.

Registered in webdataset's gopen table at import (`register()`), so DataLoader workers forked
after the import inherit it. No subprocess pipes (`pipe:aws s3 cp ...` costs ~10x per shard and
loses errors). Endpoint: NFNET_S3_ENDPOINT, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import io
import logging
import time

from data_prep.storage import s3_client, split_s3

log = logging.getLogger(__name__)
TRANSIENT_RETRIES = 6


class S3ReadStream(io.RawIOBase):
    """Sequential reader of one object. A read that fails mid-stream (reset connection, timeout)
    re-opens the object at the current offset with exponential backoff (0.2 s ... 6.4 s)."""

    def __init__(self, url: str, endpoint: str | None = None):
        super().__init__()
        self.url, self.endpoint = url, endpoint
        self.bucket, self.key = split_s3(url)
        self.pos, self.body = 0, None
        self._open()

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
                self.body = s3_client(self.endpoint).get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                    raise FileNotFoundError(f"{self.url}: {code}") from e
                self._backoff(attempt, e)
            except Exception as e:  # noqa: BLE001 - connection errors of every flavour
                self._backoff(attempt, e)

    def _backoff(self, attempt: int, err: Exception) -> None:
        if attempt >= TRANSIENT_RETRIES:
            raise OSError(f"{self.url}: giving up after {attempt + 1} attempts: {err}") from err
        delay = 0.2 * 2**attempt
        log.warning("S3 read of %s failed at byte %d (%s); retrying in %.1f s", self.url, self.pos, err, delay)
        time.sleep(delay)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                data = self.body.read(len(buffer))
                n = len(data)
                buffer[:n] = data
                self.pos += n
                return n
            except Exception as e:  # noqa: BLE001
                self._backoff(attempt, e)
                self._open()
        return 0

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode {mode!r})")
    return io.BufferedReader(S3ReadStream(url, kw.get("endpoint")), buffer_size=max(bufsize, 1 << 20))


def register() -> None:
    import sys

    import webdataset  # noqa: F401 - loads webdataset.gopen

    # `webdataset.gopen` the attribute is the function; the module holds the scheme table.
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = gopen_s3


register()
