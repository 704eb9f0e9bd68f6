"""data_prep: packing class folders and manifests, bad input, dedup, atomicity and resume, S3, Ray."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from corpus_utils import add_bad_zoo, copy_duplicate, jpeg_bytes, make_class_folders, rand_image, save
from PIL import Image

from data_prep.__main__ import build_parser, main
from data_prep.images import ImageOptions
from data_prep.manifest import load_manifest
from data_prep.pack import PackOptions, heldout_draw, pack

REPO = Path(__file__).resolve().parents[1]


def read_shard(path) -> list[dict]:
    """Samples of a shard as dicts {key, jpg, cls, json} in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {"key": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def all_samples(out: Path, split: str) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [s for sh in m["splits"][split]["shards"] for s in read_shard(out / sh["name"])]


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


@pytest.fixture
def zoo(tmp_path):
    src = tmp_path / "src"
    make_class_folders(src, per_class=5)
    expected = add_bad_zoo(src / "train" / "dog", tmp_path)
    copy_duplicate(src / "train" / "cat" / "img_1.jpg", src / "train" / "emu" / "zz_copy.jpg")  # later in order
    copy_duplicate(src / "train" / "cat" / "img_2.jpg", src / "val" / "cat" / "copy.jpg")
    # orientation: a 40x20 JPEG whose EXIF says "rotate 90 CW" (6) is stored as 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    save(rand_image(11, (40, 20)), src / "train" / "emu" / "rotated.jpg", exif=exif.tobytes())
    return src, expected


def test_pack_class_folders_with_bad_input(zoo, tmp_path):
    src, expected = zoo
    out = tmp_path / "out"
    r = run_cli("pack", str(src), str(out), "--samples-per-shard", "4", "--max-pixels", "1000000", "--no-progress")
    assert "rejected: 7" in r.stdout and "duplicates kept out: 2" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog", "emu"]
    # train: 15 good + 6 convertible zoo + rotated = 22; the emu copy of cat/img_1 is a duplicate
    assert m["splits"]["train"]["samples"] == 22 and m["splits"]["val"]["samples"] == 15
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert all(s["samples"] == 4 for s in shards[:-1]) and 1 <= shards[-1]["samples"] <= 4
        assert sum(s["samples"] for s in shards) == m["splits"][split]["samples"]
        assert sum(m["splits"][split]["class_counts"]) == m["splits"][split]["samples"]
    rejected = {Path(json.loads(ln)["path"]).name: json.loads(ln)["reason"] for ln in (out / "rejected.jsonl").read_text().splitlines()}
    for name, reason in expected.items():
        if reason is None:
            assert name not in rejected
        else:
            assert rejected[name].startswith(reason), (name, rejected[name])
    dups = [json.loads(ln) for ln in (out / "duplicates.jsonl").read_text().splitlines()]
    # the copy that comes first in source order survives
    assert {(d["path"], d["duplicate_of_path"]) for d in dups} == {
        ("train/emu/zz_copy.jpg", "train/cat/img_1.jpg"), ("val/cat/copy.jpg", "train/cat/img_2.jpg")}
    train = {json.loads(s["json"])["source"]: s for s in all_samples(out, "train")}
    assert all(set(s) == {"key", "jpg", "cls", "json"} and "." not in s["key"] for s in train.values())
    # shards are written in a seeded shuffled order: the first shard already mixes classes
    first = read_shard(out / "train-000000.tar")
    assert len({int(s["cls"]) for s in first}) > 1
    # conversions: transparent -> white, 16-bit white stays white, orientation applied, RGB JPEGs
    clear = Image.open(io.BytesIO(train["train/dog/rgba_clear.png"]["jpg"]))
    assert clear.mode == "RGB" and min(clear.getpixel((8, 8))) >= 250
    assert min(Image.open(io.BytesIO(train["train/dog/gray16.png"]["jpg"])).getpixel((8, 8))) >= 250
    assert Image.open(io.BytesIO(train["train/emu/rotated.jpg"]["jpg"])).size == (20, 40)
    # an untouched baseline RGB JPEG keeps its exact bytes
    assert train["train/cat/img_0.jpg"]["jpg"] == (src / "train/cat/img_0.jpg").read_bytes()
    meta = json.loads(train["train/cat/img_0.jpg"]["json"])
    assert meta["class_name"] == "cat" and meta["original_size"] == [40, 30] and len(meta["sha256"]) == 64
    assert int(train["train/emu/rotated.jpg"]["cls"]) == 2
    assert not (out / "_staging").exists()

    assert "OK: " in run_cli("verify", str(out)).stdout
    text = run_cli("inspect", str(out)).stdout
    assert "[train] 22 samples" in text and "too many pixels" in text and "e.g. train/dog/bomb.png" in text


def test_verify_names_the_bad_shard(zoo, tmp_path):
    src, _ = zoo
    out = tmp_path / "out"
    run_cli("pack", str(src), str(out), "--samples-per-shard", "4", "--no-progress")
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    victim.write_bytes(bytes(data))
    (out / "val-000000.tar").unlink()
    r = run_cli("verify", str(out), check=False)
    assert r.returncode == 1
    assert "train-000001.tar: sha256" in r.stderr and "val-000000.tar: missing" in r.stderr
    assert "train-000000.tar" not in r.stderr
    parallel = run_cli("verify", str(out), "--workers", "2", check=False)  # the same report from 2 processes
    assert parallel.returncode == 1 and parallel.stderr.splitlines()[1:] == r.stderr.splitlines()[1:]


def test_resize_and_reencode(tmp_path):
    src = tmp_path / "src"
    save(rand_image(1, (64, 48)), src / "a" / "wide.jpg", quality=90)
    save(rand_image(2, (20, 30)), src / "a" / "small.png")
    out = tmp_path / "out"
    opts = PackOptions(samples_per_shard=10, image=ImageOptions(resize_shorter=24, quality=80))
    pack(str(src), str(out), opts, progress=False)
    by_src = {json.loads(s["json"])["source"]: Image.open(io.BytesIO(s["jpg"])) for s in all_samples(out, "train")}
    assert by_src["a/wide.jpg"].size == (32, 24)
    assert by_src["a/small.png"].size == (20, 30)  # smaller than N: not enlarged without --upscale
    assert by_src["a/small.png"].format == "JPEG"


def test_manifest_sources_csv_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = tmp_path / "imgs"
    for i in range(6):
        save(rand_image(i), imgs / f"{i}.jpg")
    (tmp_path / "folder.jpg").mkdir()  # a directory where a file should be
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n" + "".join(f"imgs/{i}.jpg,{i % 3}\n" for i in range(6)) + "imgs/missing.jpg,1\nimgs/0.jpg,7\nfolder.jpg,0\n")
    out = tmp_path / "out_csv"
    pack(str(csv), str(out), PackOptions(samples_per_shard=4), progress=False)
    m = load_manifest(str(out))
    assert m["classes"] == ["0", "1", "2", "3", "4", "5", "6", "7"]  # ints: 0..max
    assert m["splits"]["train"]["samples"] == 6 and m["duplicates"] == 1
    reasons = sorted(json.loads(ln)["reason"] for ln in (out / "rejected.jsonl").read_text().splitlines())
    assert reasons[0] == "missing file" and reasons[1].startswith("unreadable file: IsADirectoryError")

    classes = tmp_path / "classes.txt"
    classes.write_text("bird\ncat\ndog\n")
    jl = tmp_path / "m.jsonl"
    rows = [{"uri": str(imgs / f"{i}.jpg"), "labels": ["cat", "dog"] if i % 2 else "bird", "split": "val" if i == 5 else "train"}
            for i in range(6)] + [{"uri": str(imgs / "1.jpg"), "labels": "yak"}]  # fmt: skip
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out_jsonl"
    pack(str(jl), str(out), PackOptions(samples_per_shard=10, classes_file=str(classes)), progress=False)
    m = load_manifest(str(out))
    assert m["classes"] == ["bird", "cat", "dog"] and m["multi_label"]
    assert m["splits"]["train"]["samples"] == 5 and m["splits"]["val"]["samples"] == 1
    assert m["splits"]["train"]["class_counts"] == [3, 2, 2]
    assert "unknown label 'yak'" in (out / "rejected.jsonl").read_text()
    labels = sorted(json.loads(s["json"])["labels"] for s in all_samples(out, "train"))
    assert labels.count([1, 2]) == 2 and labels.count([0]) == 3

    pq_path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"file": [f"imgs/{i}.jpg" for i in range(6)], "class": ["b", "a", "b", "a", "b", "a"]}), pq_path)
    out = tmp_path / "out_pq"
    pack(str(pq_path), str(out), PackOptions(samples_per_shard=3), progress=False)
    m = load_manifest(str(out))
    assert m["classes"] == ["a", "b"] and m["splits"]["train"]["class_counts"] == [3, 3]


def test_output_independent_of_workers_and_heldout_is_stable(tmp_path):
    args = ["--limit-per-split", "600", "--samples-per-shard", "128", "--heldout-fraction", "0.1", "--chunk-size", "100", "--no-progress"]
    run_cli("pack", "fashion-mnist", str(tmp_path / "w1"), *args)
    run_cli("pack", "fashion-mnist", str(tmp_path / "w2"), *args, "--workers", "2")
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("w1", "w2"))
    assert m1["splits"] == m2["splits"]
    held = m1["splits"]["heldout"]["samples"]
    assert 30 <= held <= 90 and m1["splits"]["train"]["samples"] + held == 600
    keys = [s["key"] for s in all_samples(tmp_path / "w1", "heldout")]
    assert all(heldout_draw(k) < 0.1 for k in keys)


def _pack_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep", "pack", "fashion-mnist", str(out), "--limit-per-split", "4000",
            "--samples-per-shard", "500", "--chunk-size", "250", "--heldout-fraction", "0.05", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("kill_when", ["encoding", "writing shards"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, kill_when):
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_pack_cmd(ref), check=True, cwd=REPO, capture_output=True)
    proc = subprocess.Popen(_pack_cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "_staging" / ("chunk-000003.json" if kill_when == "encoding" else "shards/train-000001.tar.json")
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "pack finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing looks complete: no manifest, and every visible shard is whole (atomic rename)
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) % 3 == 0
    if kill_when == "writing shards":  # a finished shard altered afterwards, same size: its sidecar must not vouch for it
        victim = out / "train-000001.tar"
        data = bytearray(victim.read_bytes())
        data[700] ^= 0xFF
        victim.write_bytes(bytes(data))
    subprocess.run(_pack_cmd(out), check=True, cwd=REPO, capture_output=True)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref / "manifest.json").read_text())
    assert "OK" in run_cli("verify", str(out)).stdout
    assert not list(out.rglob("*.tmp-*"))


def test_clear_errors_for_bad_source_and_out(tmp_path):
    r = run_cli("pack", str(tmp_path / "nope"), str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("pack", str(tmp_path / "empty"), str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "holds no images" in r.stderr
    make_class_folders(tmp_path / "src", per_class=1, splits=None)
    (tmp_path / "afile").write_text("x")
    r = run_cli("pack", str(tmp_path / "src"), str(tmp_path / "afile" / "out"), check=False)
    assert r.returncode == 2 and "not writable" in r.stderr
    out = tmp_path / "o2"
    run_cli("pack", str(tmp_path / "src"), str(out), "--no-progress")
    r = run_cli("pack", str(tmp_path / "src"), str(out), "--samples-per-shard", "2", check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert "already holds this finished pack" in run_cli("pack", str(tmp_path / "src"), str(out), "--no-progress").stdout
    r = run_cli("verify", str(tmp_path / "src"), check=False)
    assert r.returncode == 2 and "manifest.json not found" in r.stderr


def test_overlapping_source_and_out_all_rejected_and_size_cap(tmp_path):
    """Nothing destroyed or dropped silently: SOURCE inside OUT (which --overwrite would delete) and OUT
    inside SOURCE are refused and SOURCE is untouched; a pack where every item is rejected exits
    non-zero with the count per reason and writes no manifest; files above --max-bytes are rejected
    with that reason."""
    out = tmp_path / "out"
    src = out / "src"
    make_class_folders(src, per_class=2, splits=None)
    before = sorted(p.name for p in src.rglob("*.jpg"))
    for args in ((str(src), str(out), "--overwrite"), (str(tmp_path / "out"), str(src / "o"))):
        r = run_cli("pack", *args, "--no-progress", check=False)
        assert r.returncode == 2 and "lies inside" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1  # one line
    assert sorted(p.name for p in src.rglob("*.jpg")) == before

    sizes = sorted(p.stat().st_size for p in src.rglob("*.jpg"))
    cap = sizes[len(sizes) // 2]  # about half the files are above it
    capped = run_cli("pack", str(src), str(tmp_path / "capped"), "--max-bytes", str(cap), "--no-progress")
    m = json.loads((tmp_path / "capped" / "manifest.json").read_text())
    too_big = sum(1 for n in sizes if n > cap)
    assert 0 < too_big < len(sizes) and m["rejected_by_reason"] == {"file too large": too_big}, capped.stdout
    rejected = [json.loads(x) for x in (tmp_path / "capped" / "rejected.jsonl").read_text().splitlines()]
    assert all(f"bytes > {cap} (--max-bytes)" in r["reason"] for r in rejected)

    r = run_cli("pack", str(src), str(tmp_path / "none"), "--max-bytes", "10", "--no-progress", check=False)
    assert r.returncode == 2, r.stdout
    assert f"nothing packed: all {len(sizes)} items were rejected ({len(sizes)} x file too large)" in r.stderr
    assert not (tmp_path / "none" / "manifest.json").exists() and (tmp_path / "none" / "rejected.jsonl").exists()


def test_missing_and_bad_label_cells_are_rejected_by_row(tmp_path):
    """Empty or absent label cells once became classes '' and 'None'; in an integer-labelled manifest
    one name failed the whole file naming no row. Now each such row is rejected, naming its row."""
    for i in range(5):
        save(rand_image(i), tmp_path / f"i{i}.jpg")
    (tmp_path / "m.csv").write_text("path,label\ni0.jpg,0\ni1.jpg,\ni2.jpg,cat\ni3.jpg,1\ni4.jpg,2\n")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"path": "i0.jpg", "label": "cat"}, {"path": "i1.jpg", "label": None}, {"path": "i2.jpg"},
        {"path": "i3.jpg", "label": "dog"}, {"path": "i4.jpg", "label": "[1, 2"}, {"path": "i0.jpg", "label": 7})) + "\n")  # fmt: skip
    pack(str(tmp_path / "m.csv"), str(tmp_path / "o1"), PackOptions(samples_per_shard=10), progress=False)
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert m["classes"] == ["0", "1", "2"] and m["splits"]["train"]["samples"] == 3
    reasons = sorted(json.loads(x)["reason"] for x in (tmp_path / "o1" / "rejected.jsonl").read_text().splitlines())
    assert reasons == ["label 'cat' in row 3 of m.csv is not an integer class index (the column holds integers)",
                       "missing label (empty 'label') in row 2 of m.csv"]  # fmt: skip
    pack(str(tmp_path / "m.jsonl"), str(tmp_path / "o2"), PackOptions(samples_per_shard=10), progress=False)
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog"] and m["splits"]["train"]["samples"] == 2
    reasons = sorted(json.loads(x)["reason"] for x in (tmp_path / "o2" / "rejected.jsonl").read_text().splitlines())
    assert reasons[0] == "label 7 in row 6 of m.jsonl is a number among class names (pass --classes FILE to map numbers and names)"
    assert reasons[1] == "missing label (empty 'label') in row 2 of m.jsonl"
    assert reasons[2] == "missing label (empty 'label') in row 3 of m.jsonl"
    assert reasons[3].startswith("unparsable label '[1, 2' in row 5 of m.jsonl")


def test_symlinked_class_folders_are_followed_and_loops_recorded(tmp_path):
    """Class folders that are symlinks (ImageNet on shared storage) are packed; a link back up the tree
    is walked once, and the folder it would repeat is recorded as skipped."""
    store = tmp_path / "store"
    make_class_folders(store, per_class=2, classes=("cat", "dog"), splits=None)
    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    for c in ("cat", "dog"):
        (src / c).symlink_to(store / c, target_is_directory=True)
    (store / "dog" / "loop").symlink_to(store, target_is_directory=True)  # dog/loop -> the whole store
    summary = pack(str(tmp_path / "src"), str(tmp_path / "out"), PackOptions(samples_per_shard=10), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog"] and m["splits"]["train"]["class_counts"] == [2, 2], summary
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    # dog/loop is the store itself: its cat and dog were walked already, through the class links
    assert sorted(r["path"] for r in rejected) == ["train/dog/loop/cat", "train/dog/loop/dog"], rejected
    assert all("already walked (symlink loop or second link)" in r["reason"] for r in rejected)


def test_names_that_are_not_utf8_are_rejected_with_an_escaped_name(tmp_path):
    """A byte that is not UTF-8 in a file or folder name once crashed the pack with a traceback."""
    src = tmp_path / "src"
    make_class_folders(src, per_class=2, classes=("cat",), splits=("train",))
    data = (src / "train" / "cat" / "img_0.jpg").read_bytes()
    root = bytes(src)
    os.makedirs(root + b"/train/d\xffg")
    (Path(os.fsdecode(root + b"/train/cat/b\xe9d.jpg"))).write_bytes(data + b"1")
    (Path(os.fsdecode(root + b"/train/d\xffg/x.jpg"))).write_bytes(data + b"2")
    r = run_cli("pack", str(src), str(tmp_path / "out"), "--no-progress")
    assert "2 x file or folder name is not valid UTF-8" in r.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["classes"] == ["cat"] and m["splits"]["train"]["samples"] == 2
    raw = (tmp_path / "out" / "rejected.jsonl").read_bytes()
    raw.decode("utf-8")  # the record is valid UTF-8 text
    paths = sorted(json.loads(x)["path"] for x in raw.decode().splitlines())
    assert paths == ["train/cat/b\\xe9d.jpg", "train/d\\xffg/x.jpg"]


def test_a_changed_source_is_named_not_skipped_or_mixed(tmp_path):
    """A pack's identity includes what SOURCE held (names, sizes, mtimes): images added after a pack
    once made a rerun say 'nothing to do', and a resume after a change silently dropped items."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_class_folders(src, per_class=2, splits=None)
    assert run_cli("pack", str(src), str(out), "--no-progress", "--keep-staging").returncode == 0
    assert "nothing to do" in run_cli("pack", str(src), str(out), "--no-progress").stdout  # unchanged
    save(rand_image(77), src / "cat" / "new.jpg")
    r = run_cli("pack", str(src), str(out), "--no-progress", check=False)
    assert r.returncode == 2 and "changed since" in r.stderr and "(6 files, " in r.stderr and "then, 7 files, " in r.stderr, r.stderr
    # an interrupted pack (no manifest yet) whose SOURCE then changed is not resumed into a mix
    (out / "manifest.json").unlink()
    r = run_cli("pack", str(src), str(out), "--no-progress", check=False)
    assert r.returncode == 2 and "changed since the interrupted pack" in r.stderr, r.stderr
    run_cli("pack", str(src), str(out), "--no-progress", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["samples"] == 7


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.dest)


def test_s3_output_and_s3_source(tmp_path, s3_server, s3_bucket):
    from data_prep.storage import Store

    src = tmp_path / "src"
    make_class_folders(src, per_class=4, splits=None)
    (src / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    out = f"s3://{s3_bucket}/packed"
    assert main(["pack", str(src), out, "--samples-per-shard", "5", "--s3-endpoint", s3_server, "--no-progress"]) == 0
    m = load_manifest(out, s3_server)
    assert m["splits"]["train"]["samples"] == 12 and m["rejected"] == 1
    store = Store(out, s3_server)
    assert store.list() == ["duplicates.jsonl", "manifest.json", "offsets.npy", "rejected.jsonl", "train-000000.tar", "train-000001.tar",
                            "train-000002.tar"]  # fmt: skip
    assert main(["verify", out, "--s3-endpoint", s3_server]) == 0
    # a class-folder corpus under an s3:// prefix as SOURCE gives the same shards as the local copy
    src_store = Store(f"s3://{s3_bucket}/corpus", s3_server)
    for p in src.rglob("*.jpg"):
        src_store.write_bytes_atomic(str(p.relative_to(src)), p.read_bytes())
    out2 = f"s3://{s3_bucket}/packed2"
    assert main(["pack", f"s3://{s3_bucket}/corpus", out2, "--samples-per-shard", "5", "--no-progress"]) == 0
    m2 = load_manifest(out2)
    assert [s["sha256"] for s in m2["splits"]["train"]["shards"]] == [s["sha256"] for s in m["splits"]["train"]["shards"]]
    # corrupt one object: verify fails and names it
    data = bytearray(store.read_bytes("train-000001.tar"))
    data[600] ^= 1
    store.write_bytes_atomic("train-000001.tar", bytes(data))
    assert main(["verify", out]) == 1


@pytest.mark.slow
def test_ray_pack_on_local_cluster_matches_local(tmp_path, ray_cluster):
    src = tmp_path / "src"
    make_class_folders(src, per_class=8)
    args = ["--samples-per-shard", "5", "--chunk-size", "7", "--heldout-fraction", "0.2", "--no-progress"]
    run_cli("pack", str(src), str(tmp_path / "local"), *args)
    p = subprocess.run([sys.executable, "-m", "data_prep", "pack", str(src), str(tmp_path / "ray"), *args, "--ray",
                        "--ray-address", ray_cluster["address"]], capture_output=True, text=True, cwd=REPO, env=ray_cluster["env"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("local", "ray"))
    assert a["splits"] == b["splits"] and b["splits"]["train"]["samples"] + b["splits"]["heldout"]["samples"] == 24
    v = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(tmp_path / "ray"), "--ray", "--ray-address",
                        ray_cluster["address"]], capture_output=True, text=True, cwd=REPO, env=ray_cluster["env"])  # fmt: skip
    total = sum(s["samples"] for s in b["splits"].values())
    assert v.returncode == 0 and f"shards, {total} samples match" in v.stdout and "MB/s" in v.stdout, v.stderr[-2000:]


def _rchar() -> int:
    """Bytes this process has read through read()/pread() syscalls (/proc/self/io), files or not."""
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))


def test_pack_reads_grow_linearly_with_the_corpus(tmp_path):
    """Packing 4x the corpus reads 4x the bytes: a shard task reads its samples' staging segments, not
    whole chunks. With 8 items per chunk and 40 per shard, reading whole chunks read 1.4x (corpus +
    output) at 160 items and 2.3x at 640 (measured before the change), and grows without bound."""
    ratios = {}
    for per_class in (10, 40, 160):  # the first run warms up lazy imports (PIL plugins) and is not counted
        src = tmp_path / f"src{per_class}"
        make_class_folders(src, per_class=per_class, classes=("a", "b", "c", "d"), splits=("train",))
        corpus = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        before = _rchar()
        summary = pack(str(src), str(tmp_path / f"out{per_class}"), PackOptions(samples_per_shard=40, chunk_size=8), progress=False)
        ratios[per_class] = (_rchar() - before) / (corpus + summary["bytes"])
    small, large = ratios[40], ratios[160]
    assert small < 0.8 and large < 0.8, ratios  # measured 0.70 and 0.68: sources and segments once each
    assert large <= small * 1.03, ratios


def test_plan_memory_is_a_few_dozen_bytes_per_item():
    """The plan stage keeps fixed-width columns, not records: tracemalloc's peak per item is the same
    at 10k and 40k items and far below the ~1.4 KB per item of holding every record. Duplicates are
    still found (the first copy in source order kept) and counted per class."""
    import tracemalloc

    from data_prep.plan import make_plan

    def loader(n: int, cs: int):
        def load(c: int) -> list[dict]:
            return [{"key": f"k{g}", "split": "train", "labels": [g % 7], "path": f"p{g}", "location": f"/x/p{g}",
                     "status": "ok", "sha256": f"{g % (n - 10):032x}" + "0" * 32, "segment": [g, 1]}  # the last 10 repeat the first 10
                    for g in range(c * cs, min(n, (c + 1) * cs))]  # fmt: skip

        return load

    per_item = {}
    for n in (10_000, 40_000):
        tracemalloc.start()
        plan = make_plan(loader(n, 512), -(-n // 512), 512, n, 7, 100, "global", 0.0, 0)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per_item[n] = (held / n, peak / n)
        assert plan.split_counts == {"train": n - 10}
        assert [(d["key"], d["duplicate_of_key"]) for d in plan.duplicates] == [(f"k{n - 10 + i}", f"k{i}") for i in range(10)]
        assert sum(plan.class_counts["train"]) == n - 10
        assert sorted(plan.order["train"].tolist()) == list(range(n - 10))
        del plan
    for held, peak in per_item.values():
        assert held < 40 and peak < 125, per_item  # measured ~36 and ~108 bytes per item
    assert per_item[40_000][1] < 1.05 * per_item[10_000][1], per_item  # flat: no per-item record kept


def test_item_table_round_trips_what_a_listing_holds():
    """The packed listing returns exactly what went in: names that are not UTF-8 (surrogates),
    reject None vs '', label tuples, splits; a NUL in a name is shown escaped and rejected, not split."""
    from data_prep.sources import ItemTable, SourceItem

    items = [SourceItem("k1", "train", (3, 1), "/d/a\udcff.jpg", "a\udcff.jpg"),
             SourceItem("k2", "val", (), "s3://b/x.jpg", "x.jpg", ""),
             SourceItem("k3", "odd split", (0,), "/d/y.jpg", "y.jpg", "bad label")]  # fmt: skip
    table = ItemTable(items)
    assert len(table) == 3 and list(table) == items and table[1:] == items[1:] and table[-1] == items[-1]
    nul = ItemTable([SourceItem("k4", "train", (0,), "/d/a\0b.jpg", "a\0b.jpg")])[0]
    assert nul.rel == "a\\x00b.jpg" and nul.reject == "name contains a NUL byte: a\\x00b.jpg"


def test_a_pack_interrupted_under_the_old_staging_format_is_refused(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_class_folders(src, per_class=2, splits=None)
    pack(str(src), str(out), PackOptions(samples_per_shard=4), progress=False, keep_staging=True)
    (out / "manifest.json").unlink()  # interrupted before the manifest ...
    marker = out / "_staging" / "pack.json"
    doc = json.loads(marker.read_text())
    del doc["staging"]  # ... by a data_prep that wrote per-field spans (format 1)
    marker.write_text(json.dumps(doc))
    r = run_cli("pack", str(src), str(out), "--no-progress", "--samples-per-shard", "4", check=False)
    assert r.returncode == 2 and "staging format 1, now 2" in r.stderr and "--overwrite" in r.stderr, r.stderr
