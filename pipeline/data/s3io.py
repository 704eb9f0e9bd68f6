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
DEFAULT_RETRY_S = 600.0  # data.s3_retry_s: how long an outage is waited out before the step fails
MAX_DELAY_S = 30.0


class S3Unavailable(OSError):
    """S3 stayed unreachable for the whole retry time: the training step fails (Ray Train restores the
    last checkpoint) instead of substituting samples, unless data.substitute_on_s3_outage is set."""


class S3ReadStream(io.RawIOBase):
    """Sequential reader of one object. A read that fails (reset connection, timeout, 5xx) re-opens
    the object at the current offset with exponential backoff (0.2 s doubling, at most 30 s a wait)
    for up to `retry_s` seconds of continuous failure (an outage of minutes is waited out; the old
    fixed 6 retries gave up after ~13 s and the loader substituted samples)."""

    def __init__(self, url: str, endpoint: str | None = None, retry_s: float = DEFAULT_RETRY_S):
        super().__init__()
        self.url, self.endpoint, self.retry_s = url, endpoint, retry_s
        self.bucket, self.key = split_s3(url)
        self.pos, self.body, self._failing_since = 0, None, None
        self._open()

    def _open(self) -> None:
        """GET from the current offset. Does not reset the failure clock: only bytes read do (a server
        that answers GETs but drops every body is still an outage)."""
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            started = time.monotonic()  # the clock starts before botocore's own retries of this call
            try:
                extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
                self.body = s3_client(self.endpoint).get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                # The shards were checked at start: a missing key is lost data (counted); a 403 may be
                # an auth backend that is down, so it is retried like any outage.
                if code in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise FileNotFoundError(f"{self.url}: {code}") from e
                self._backoff(attempt, e, started)
            except Exception as e:  # noqa: BLE001 - connection errors of every flavour
                self._backoff(attempt, e, started)
            attempt += 1

    def _backoff(self, attempt: int, err: Exception, started: float) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = started
        waited = now - self._failing_since
        if waited >= self.retry_s:
            raise S3Unavailable(f"{self.url}: S3 unreachable for {waited:.0f} s (data.s3_retry_s={self.retry_s:g}): "
                                f"{type(err).__name__}: {err}") from err  # fmt: skip
        delay = min(0.2 * 2 ** min(attempt, 10), MAX_DELAY_S, self.retry_s - waited)
        log.warning("S3 read of %s failed at byte %d (%s); retrying in %.1f s", self.url, self.pos, err, delay)
        time.sleep(delay)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                data = self.body.read(len(buffer))
                n = len(data)
                buffer[:n] = data
                self.pos += n
                if n:  # progress: the outage (if any) is over
                    self._failing_since = None
                return n
            except Exception as e:  # noqa: BLE001
                self._backoff(attempt, e, started)
                self._open()
            attempt += 1

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode {mode!r})")
    return io.BufferedReader(S3ReadStream(url, kw.get("endpoint"), kw.get("retry_s", DEFAULT_RETRY_S)),
                             buffer_size=max(bufsize, 1 << 20))  # fmt: skip


def register() -> None:
    import sys

    import webdataset  # noqa: F401 - loads webdataset.gopen

    # `webdataset.gopen` the attribute is the function; the module holds the scheme table.
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = gopen_s3


register()
