"""S3 reads for the loader: ranged GETs of a worker's own samples, and an `s3://` opener for webdataset.

Both are boto3 streaming GETs resumed with Range on transient errors (S3ReadStream). The loader uses
`read_range` whenever the manifest has per-sample offsets (every pack since 0.2): a DataLoader worker
fetches only its own samples, adjacent ones coalesced into one GET, so an epoch fetches each byte
once whatever the worker count. The opener streams whole shards for older packs.

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

    def __init__(self, url: str, endpoint: str | None = None, retry_s: float = DEFAULT_RETRY_S, start: int = 0,
                 end: int | None = None):  # fmt: skip
        super().__init__()
        self.url, self.endpoint, self.retry_s = url, endpoint, retry_s
        self.bucket, self.key = split_s3(url)
        self.pos, self.end, self.body, self._failing_since = start, end, None, None  # end: exclusive; None = to the end
        self._open()

    def _open(self) -> None:
        """GET from the current offset. Does not reset the failure clock: only bytes read do (a server
        that answers GETs but drops every body is still an outage)."""
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            started = time.monotonic()  # the clock starts before botocore's own retries of this call
            try:
                last = "" if self.end is None else str(self.end - 1)
                extra = {"Range": f"bytes={self.pos}-{last}"} if self.pos or self.end is not None else {}
                self.body = s3_client(self.endpoint).get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                # The shards were checked at start: a missing key is lost data (counted); a 403 may be
                # an auth backend that is down, so it is retried like any outage.
                if code in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise FileNotFoundError(f"{self.url}: {code}") from e
                if code == "InvalidRange":  # the object is shorter than the manifest says: lost data, counted
                    raise EOFError(f"{self.url}: bytes {self.pos}-{self.end} lie beyond the object's end") from e
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
        if self.end is not None and self.pos >= self.end:
            return 0
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                data = self.body.read(len(buffer))
                n = len(data)
                if not n and self.end is not None and self.pos < self.end:  # a body cut off: resume, don't stop
                    raise ConnectionError(f"response body ended at byte {self.pos} of a range ending at {self.end}")
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


def read_range(url: str, start: int, end: int, endpoint: str | None = None, retry_s: float = DEFAULT_RETRY_S) -> bytes:
    """Bytes [start, end) of an object: one ranged GET, resumed from where it stopped on errors."""
    stream = S3ReadStream(url, endpoint, retry_s, start, end)
    try:
        chunks, n = [], end - start
        while n > 0:
            data = stream.read(n)
            if not data:
                raise EOFError(f"{url}: range {start}-{end} ends early, at byte {end - n} (object shorter than the manifest says)")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)
    finally:
        stream.close()


def coalesce(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, end) byte spans -> the fewest covering GET ranges with no byte outside a span:
    touching spans merge (consecutive samples of a shard are back to back), gaps never do, so the
    bytes fetched are exactly the bytes wanted."""
    out: list[list[int]] = []
    for a, b in spans:
        if out and a == out[-1][1]:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


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
