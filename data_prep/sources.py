"""Enumerate a SOURCE into an ordered list of items, without reading image bytes.

SOURCE forms:
- a local directory of class folders (`<root>/<class>/*`), or with `train/` and `val/` below
  the root, each a split of class folders; ImageNet's flat `val/` (images directly in it) is
  labelled from a CSV given as `val_labels` (image id or file name -> class name; Kaggle's
  LOC_val_solution.csv "ImageId,PredictionString" works as is);
- a manifest file: .csv, .jsonl/.ndjson, or .parquet, one row per image with a local path (relative
  to the manifest's folder) or an s3:// URI, and a label (int, class name, or a list for
  multi-label corpora); an optional `split` column;
- `s3://bucket/prefix` in class-folder layout;
- `fashion-mnist`: the sample corpus from the Debian package's IDX files.

The order of items is the order of the output: sorted (split, class, path) for folders, row order
for manifests. It never depends on the number of workers.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import re
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .storage import is_s3, s3_client, split_s3

FASHION_MNIST_DIR = os.environ.get("NFNET_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val")


class SourceError(Exception):
    """The SOURCE as a whole cannot be used (missing, unreadable, empty, malformed)."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, stable, no dots (webdataset splits keys at the first dot)
    split: str
    labels: tuple[int, ...]
    location: str  # local path, s3:// URI, or fashion-mnist:<file>:<index>
    rel: str  # the path a user recognises (relative to SOURCE), recorded in each sample's json
    reject: str | None = None  # known bad before reading (unknown label, ...)


class ItemTable(Sequence[SourceItem]):
    """A listing's items packed into a few flat buffers: ~150 bytes per item where a list of
    SourceItem costs ~460 (five str objects, a tuple and the instance): 1.5 GB instead of 4.6 GB in
    the driver at 10M items. Indexing materialises SourceItems (a slice: a list, for one chunk task)."""

    def __init__(self, items: Iterable[SourceItem] = ()):
        self._text = bytearray()  # per item: key, location, rel[, reject] joined by NUL, UTF-8 (surrogateescape)
        self._ends = array("q")
        self._labels, self._label_ends = array("l"), array("q")
        self._split, self._split_names = array("h"), {}  # int16: split names are free text in manifests
        for it in items:
            self.append(it)

    def append(self, it: SourceItem) -> None:
        parts = [it.key, it.location, it.rel] + ([it.reject] if it.reject is not None else [])
        if any("\0" in p for p in parts):  # NUL separates the fields: a name holding one is shown escaped and rejected
            shown = [p.replace("\0", "\\x00") for p in parts[:3]]
            parts = shown + [f"name contains a NUL byte: {shown[2]}"]
        self._text += "\0".join(parts).encode("utf-8", "surrogateescape")
        self._ends.append(len(self._text))
        self._labels.extend(it.labels)
        self._label_ends.append(len(self._labels))
        self._split.append(self._split_names.setdefault(it.split, len(self._split_names)))

    def __len__(self) -> int:
        return len(self._ends)

    def _item(self, i: int) -> SourceItem:
        start = self._ends[i - 1] if i else 0
        parts = self._text[start : self._ends[i]].decode("utf-8", "surrogateescape").split("\0")
        lo = self._label_ends[i - 1] if i else 0
        split = next(n for n, c in self._split_names.items() if c == self._split[i])
        return SourceItem(parts[0], split, tuple(self._labels[lo : self._label_ends[i]]), parts[1], parts[2],
                          parts[3] if len(parts) > 3 else None)  # fmt: skip

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)


@dataclass
class Corpus:
    classes: list[str]
    items: ItemTable
    description: str
    multi_label: bool = False
    extra: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {path, reason}: folders not walked; into rejected.jsonl
    # What SOURCE held when listed: {"sha256", "files", "bytes"} over (name, size) of every visible file
    # (S3: key, size, ETag; a manifest: its content). Part of a pack's identity (pack._prepare_out).
    # Not mtimes: a copy without -p (or a re-staging to node-local disk) changes them, not the corpus.
    listing: dict = field(default_factory=dict)


class _Listing:
    """Accumulates the listing fingerprint; entries must be added in a deterministic (sorted) order."""

    def __init__(self):
        self.sha, self.files, self.bytes = hashlib.sha256(), 0, 0

    def add(self, name: str, size: int, version) -> None:
        self.sha.update(f"{name}\0{size}\0{version}\n".encode("utf-8", "surrogateescape"))
        self.files += 1
        self.bytes += size

    def done(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "files": self.files, "bytes": self.bytes}


def make_key(rel: str) -> str:
    """Readable and unique: the sanitised path without extension plus 8 hex digits of its hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel).strip("_")
    # surrogateescape: a local name with bytes that are not UTF-8 arrives from os.walk as surrogates
    return f"{stem[-80:]}_{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def not_utf8(rel: str) -> str | None:
    """The name with its undecodable bytes shown as \\xNN when `rel` is not valid UTF-8, else None."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def load_corpus(source: str, *, classes_file: str | None = None, path_column: str | None = None,
                label_column: str | None = None, limit_per_split: int = 0, endpoint: str | None = None,
                val_labels: str | None = None) -> Corpus:  # fmt: skip
    if source == "fashion-mnist":
        corpus = _fashion_mnist()
    elif is_s3(source):
        corpus = _class_folders_s3(source, endpoint, _read_val_labels(val_labels) if val_labels else None, val_labels)
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"SOURCE {source} does not exist")
        if not os.access(path, os.R_OK):
            raise SourceError(f"SOURCE {source} is not readable (permission denied)")
        if path.is_dir():
            corpus = _class_folders_local(path, _read_val_labels(val_labels) if val_labels else None, val_labels)
        elif path.suffix.lower() in (".csv", ".jsonl", ".ndjson", ".parquet"):
            corpus = _manifest(path, classes_file, path_column, label_column)
            listing = _Listing()  # the manifest's content (the files it names are not stat'ed)
            listing.add(hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size, "content")
            corpus.listing = listing.done() | {"files": len(corpus.items)}
        else:
            raise SourceError(f"SOURCE {source}: expected a directory, a .csv/.jsonl/.parquet manifest, s3://... or fashion-mnist")
    if val_labels and corpus.listing:  # the labels of a flat val/ are part of what SOURCE says
        corpus.listing["val_labels_sha256"] = hashlib.sha256(Path(val_labels).read_bytes()).hexdigest()
    if classes_file and corpus.listing:  # so is the class list that maps labels to indices
        corpus.listing["classes_sha256"] = hashlib.sha256(Path(classes_file).read_bytes()).hexdigest()
    if limit_per_split:
        seen: dict[str, int] = {}
        kept = ItemTable()
        for it in corpus.items:
            if seen.get(it.split, 0) < limit_per_split:
                kept.append(it)
                seen[it.split] = seen.get(it.split, 0) + 1
        corpus.items = kept
    if not corpus.items:
        raise SourceError(f"SOURCE {source} holds no images")
    return corpus


# ---- class folders -----------------------------------------------------------------------------
def _split_and_class(parts: list[str], has_splits: bool) -> tuple[str, str] | None:
    if has_splits:
        if len(parts) < 3 or parts[0] not in SPLIT_DIRS:
            return None
        return parts[0], parts[1]
    if len(parts) < 2:
        return None
    return "train", parts[0]


def _read_val_labels(path: str) -> dict[str, str]:
    """A labels CSV for a flat val/: image id (file name or its stem) -> class name.

    Two columns with or without a header; in Kaggle's LOC_val_solution.csv the second column is
    "n01751748 x0 y0 x1 y1 ...", whose first token is the class."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise SourceError(f"val labels file {path}: {e.strerror or e}") from e
    out: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].strip():
            raise SourceError(f"val labels file {path}: line {n} needs two columns (image id, class), got {row!r}")
        image, label = row[0].strip(), row[1].split()[0]
        if n == 1 and image.lower() in ("imageid", "image_id", "image", "id", "file", "filename", "path"):
            continue  # header
        out[Path(image).stem] = label
    if not out:
        raise SourceError(f"val labels file {path} has no rows")
    return out


def _build_folder_corpus(rels: list[str], locate, description: str, val_labels: dict[str, str] | None = None,
                         labels_file: str | None = None) -> Corpus:  # fmt: skip
    rels = [r for r in rels if not any(p.startswith(".") for p in r.split("/"))]
    # A file or folder name that is not UTF-8 cannot be a class name or a manifest path: each such
    # file is rejected with its name escaped (it once crashed the pack with a traceback).
    bad_names = [(r, shown) for r in rels if (shown := not_utf8(r)) is not None]
    rels = [r for r in rels if not_utf8(r) is None]
    has_splits = any(r.split("/")[0] in SPLIT_DIRS and len(r.split("/")) >= 3 for r in rels)
    placed = [(sc, r) for r in rels if (sc := _split_and_class(r.split("/"), has_splits)) is not None]
    flat_val = [r for r in rels if val_labels is not None and r.split("/")[0] == "val" and len(r.split("/")) == 2]
    if val_labels is not None and not flat_val:
        raise SourceError(f"a val labels file was given but {description} has no images directly in val/")
    classes = sorted({c for (_, c), _ in placed})
    index = {c: i for i, c in enumerate(classes)}
    items = ItemTable()
    for (split, cls), rel in sorted(placed, key=lambda t: (t[0][0], t[0][1], t[1])):
        ext = Path(rel).suffix.lower()
        reject = None if ext in IMAGE_EXTENSIONS else f"unsupported file extension {ext or '(none)'}"
        items.append(SourceItem(make_key(rel), split, (index[cls],), locate(rel), rel, reject))
    for rel in sorted(flat_val):  # labelled from the CSV; a label outside the train classes is rejected, named
        ext = Path(rel).suffix.lower()
        label = val_labels.get(Path(rel).stem)
        reject, ids = None, (0,)
        if ext not in IMAGE_EXTENSIONS:
            reject = f"unsupported file extension {ext or '(none)'}"
        elif label is None:
            reject = f"no label for {rel} in {labels_file}"
        elif label not in index:
            reject = f"unknown label {label!r} for {rel} in {labels_file} (not a class folder of train/)"
        else:
            ids = (index[label],)
        items.append(SourceItem(make_key(rel), "val", ids, locate(rel), rel, reject))
    for rel, shown in bad_names:
        sc = _split_and_class(rel.split("/"), has_splits)
        items.append(SourceItem(make_key(rel), sc[0] if sc else "train", (0,), locate(shown), shown,
                                f"file or folder name is not valid UTF-8: {shown}"))  # fmt: skip
    return Corpus(classes, items, description)


def _class_folders_local(root: Path, val_labels: dict[str, str] | None = None, labels_file: str | None = None) -> Corpus:
    """Symlinked folders are followed (ImageNet on shared storage often links its class folders); a
    folder reached again through a link (a loop, or a second link to it) is skipped and recorded."""
    rels, skipped, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk, followlinks=True):
        rel_dir = str(Path(dirpath).relative_to(root)).replace(os.sep, "/")
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            skipped.append({"path": rel_dir, "reason": f"folder skipped: it links to {real}, already walked (symlink loop or second link)"})
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            rels.append(str((Path(dirpath) / f).relative_to(root)).replace(os.sep, "/"))
    corpus = _build_folder_corpus(rels, lambda rel: str(root / rel), f"class folders {root}", val_labels, labels_file)
    corpus.skipped = skipped
    # One stat per file: 1.3M on ImageNet, seconds on a local disk but minutes one at a time on a
    # network filesystem (NFS, Lustre: ~1 ms a stat), so 32 threads stat at once (os.stat drops the GIL);
    # map() keeps the sorted order the fingerprint needs; blocks of 4096 bound the pending futures.
    listing = _Listing()
    seen = sorted(r for r in rels if not any(p.startswith(".") for p in r.split("/")))  # what the corpus sees
    with ThreadPoolExecutor(32, thread_name_prefix="stat") as pool:
        for lo in range(0, len(seen), 4096):
            block = seen[lo : lo + 4096]
            for rel, size in zip(block, pool.map(lambda r: _size_or_missing(root / r), block)):
                listing.add(rel, size, "")
    corpus.listing = listing.done()
    return corpus


def _size_or_missing(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # vanished or a broken link: the pack rejects it; the listing notes it as -1
        return -1


def _raise_walk(err: OSError):
    raise SourceError(f"cannot read {err.filename}: {err.strerror}")


def _class_folders_s3(url: str, endpoint: str | None, val_labels: dict[str, str] | None = None,
                      labels_file: str | None = None) -> Corpus:  # fmt: skip
    bucket, prefix = split_s3(url)
    client = s3_client(endpoint)
    rels, listing = [], _Listing()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            for obj in page.get("Contents", []):  # keys come sorted
                rels.append(obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"])
                listing.add(rels[-1], int(obj.get("Size", 0)), obj.get("ETag", ""))
    except Exception as e:  # noqa: BLE001 - one clear message for a bad SOURCE
        raise SourceError(f"SOURCE {url} cannot be listed: {type(e).__name__}: {e}") from e
    base = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    corpus = _build_folder_corpus(rels, lambda rel: f"{base}/{rel}", f"class folders {url}", val_labels, labels_file)
    corpus.listing = listing.done()
    return corpus


# ---- manifests ---------------------------------------------------------------------------------
_PATH_COLUMNS = ("path", "uri", "url", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "labels", "class", "cls")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class _Missing:
    """An empty or absent label cell (CSV '', JSON null, a missing key, NaN): its row is rejected."""


MISSING = _Missing()


def _parse_label(value):
    """int, class name, or a list of either; CSV cells may hold "3", "cat", "[1, 2]" or "cat;dog".
    An empty or absent cell is MISSING (it once became the classes '' and 'None')."""
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return MISSING
    if isinstance(value, (list, tuple)):
        return [_parse_label(v) for v in value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text.startswith("["):
        return [_parse_label(v) for v in json.loads(text)]
    if ";" in text or "|" in text:
        return [_parse_label(v) for v in re.split(r"[;|]", text) if v.strip()]
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _manifest(path: Path, classes_file: str | None, path_column: str | None, label_column: str | None) -> Corpus:
    rows = _read_rows(path)
    if not rows:
        raise SourceError(f"SOURCE {path} has no rows")
    columns = set(rows[0])
    pcol = path_column or next((c for c in _PATH_COLUMNS if c in columns), None)
    lcol = label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
    for want, col, options in (("path", pcol, _PATH_COLUMNS), ("label", lcol, _LABEL_COLUMNS)):
        if col is None or col not in columns:
            raise SourceError(f"{path}: no {want} column (looked for {col or ' / '.join(options)}; columns are {sorted(columns)})")
    labels = []
    for n, r in enumerate(rows, 1):
        try:
            labels.append(_parse_label(r.get(lcol)))
        except (ValueError, TypeError) as e:  # e.g. a cell "[1, 2" that is not JSON
            labels.append(ValueError(f"unparsable label {r.get(lcol)!r} in row {n} of {path.name} ({e})"))
    flat = [x for lab in labels if not isinstance(lab, (_Missing, ValueError))
            for x in (lab if isinstance(lab, list) else [lab]) if not isinstance(x, _Missing)]
    ints = sum(isinstance(x, int) for x in flat)
    # Integer labels (class indices) unless most cells are names; in an integer manifest a name is
    # rejected with its row (it once failed the whole file naming no row).
    integer_mode = ints * 2 >= len(flat) and not classes_file
    if classes_file:
        classes = [ln.strip() for ln in Path(classes_file).read_text().splitlines() if ln.strip()]
    elif not flat:
        raise SourceError(f"{path}: no row has a label in column {lcol!r}")
    elif integer_mode:
        classes = [str(i) for i in range(max(x for x in flat if isinstance(x, int)) + 1)]
    else:
        classes = sorted({x for x in flat if isinstance(x, str)})
    index = {c: i for i, c in enumerate(classes)}

    items = ItemTable()
    for n, (row, lab) in enumerate(zip(rows, labels), 1):
        ref = str(row.get(pcol) or "")
        location = ref if is_s3(ref) or os.path.isabs(ref) else str(path.parent / ref)
        rel = ref
        split = str(row.get("split") or "train")
        reject, ids = None, []
        for x in [] if isinstance(lab, (_Missing, ValueError)) else lab if isinstance(lab, list) else [lab]:
            if isinstance(x, str) and integer_mode:
                reject = f"label {x!r} in row {n} of {path.name} is not an integer class index (the column holds integers)"
                break
            if isinstance(x, int) and not integer_mode and not classes_file:
                reject = (f"label {x} in row {n} of {path.name} is a number among class names "
                          "(pass --classes FILE to map numbers and names)")  # fmt: skip
                break
            if isinstance(x, list):
                reject = f"nested label list {x!r} in row {n} of {path.name}"
                break
            i = index.get(x) if isinstance(x, str) else (x if isinstance(x, int) and 0 <= x < len(classes) else None)
            if i is None:
                reject = f"unknown label {x!r} in row {n} of {path.name}"
                break
            ids.append(i)
        if isinstance(lab, _Missing) or (isinstance(lab, list) and (not lab or any(isinstance(x, _Missing) for x in lab))):
            reject = f"missing label (empty {lcol!r}) in row {n} of {path.name}"
        elif isinstance(lab, ValueError):
            reject = str(lab)
        if not ref:
            reject = f"empty {pcol!r} in row {n} of {path.name}"
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            reject = f"invalid split {split!r} in row {n} of {path.name}"
        items.append(SourceItem(make_key(f"{n:09d}/{rel}"), split, tuple(ids), location, rel, reject))
    multi = any(isinstance(lab, list) for lab in labels)
    return Corpus(classes, items, f"manifest {path}", multi_label=multi)


# ---- the built-in sample corpus ----------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def fashion_mnist_arrays(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) from the IDX .gz files."""
    root = Path(FASHION_MNIST_DIR)
    img_path, lab_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists():
        raise SourceError(f"the sample corpus is not installed ({img_path} missing): sudo apt-get install dataset-fashion-mnist")
    with gzip.open(img_path) as f:
        raw = f.read()
    magic, n, h, w = np.frombuffer(raw[:16], dtype=">i4")
    if magic != 2051:
        raise SourceError(f"{img_path}: not an IDX image file (magic {magic})")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)
    with gzip.open(lab_path) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images, labels


def _fashion_mnist() -> Corpus:
    items = ItemTable()
    for prefix, split in (("train", "train"), ("t10k", "val")):
        _, labels = fashion_mnist_arrays(prefix)
        for i, lab in enumerate(labels):
            rel = f"{prefix}/{i:05d}"
            items.append(SourceItem(f"{prefix}_{i:05d}", split, (int(lab),), f"fashion-mnist:{prefix}:{i}", rel))
    return Corpus(list(FASHION_MNIST_CLASSES), items, "fashion-mnist (Debian dataset-fashion-mnist)")


class TooLarge(Exception):
    """A source file above the size cap; its message is the reason recorded in rejected.jsonl."""


def read_item_bytes(item: SourceItem, endpoint: str | None = None, max_bytes: int = 0) -> bytes:
    """Source bytes of one item; raises OSError subclasses with a message fit for rejected.jsonl, and
    TooLarge, before reading, for a file above `max_bytes` (0: no cap)."""

    def check(size: int) -> None:
        if max_bytes and size > max_bytes:
            raise TooLarge(f"file too large: {size} bytes > {max_bytes} (--max-bytes)")

    loc = item.location
    if loc.startswith("fashion-mnist:"):
        _, prefix, idx = loc.split(":")
        return fashion_mnist_arrays(prefix)[0][int(idx)].tobytes()
    if is_s3(loc):
        bucket, key = split_s3(loc)
        from botocore.exceptions import ClientError

        try:
            obj = s3_client(endpoint).get_object(Bucket=bucket, Key=key)
            try:  # the size comes with the response headers; the body is streamed only if it fits
                check(int(obj["ContentLength"]))
                return obj["Body"].read()
            finally:
                obj["Body"].close()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            raise FileNotFoundError(f"missing object ({code})") if code in ("NoSuchKey", "404") else OSError(f"unreadable object: {code}") from e
    with open(loc, "rb") as f:
        check(os.fstat(f.fileno()).st_size)
        return f.read()
