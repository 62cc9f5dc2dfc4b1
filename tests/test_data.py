"""robustreg.data: IDX parsing, checksums, search path, errors, shapes, ranges and splits."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from robustreg import data

fetch = data._fetch  # the real download (pooch); the `isolated` fixture replaces it with "offline"


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format (the inverse of read_idx)."""
    codes = {
        np.uint8: 0x08,
        np.int8: 0x09,
        np.int16: 0x0B,
        np.int32: 0x0C,
        np.float32: 0x0D,
        np.float64: 0x0E,
    }
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> str:
    raw = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return hashlib.sha256(raw).hexdigest()


def fake_dataset(directory: Path, n_train=12, n_test=5, gz=True, seed=0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    sums = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = data.IDX_FILES[split]
        suffix = ".gz" if gz else ""
        sums[images] = write_idx(
            directory / (images + suffix), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz
        )
        sums[labels] = write_idx(
            directory / (labels + suffix), (np.arange(n) % 10).astype(np.uint8), gz
        )
    return sums


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the real cache, $ROBUSTREG_DATA or Debian's directory, or the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTREG_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr(data, "_fetch", offline)
    data._idx_arrays.cache_clear()
    yield
    data._idx_arrays.cache_clear()


# --- the IDX parser ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    digest = write_idx(path, array, gz)
    out = data.read_idx(path, sha256=digest)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, array)


def test_read_idx_1d(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.array([3, 1, 4, 1, 5], dtype=np.uint8), gz=False)
    np.testing.assert_array_equal(data.read_idx(path), [3, 1, 4, 1, 5])


def test_read_idx_checksum_mismatch(tmp_path):
    path = tmp_path / "a.gz"
    write_idx(path, np.zeros((2, 2), np.uint8))
    with pytest.raises(data.CorruptDataError, match="checksum mismatch.*a.gz"):
        data.read_idx(path, sha256="0" * 64)


def test_checksum_is_of_decoded_bytes(tmp_path):
    """Two different gzip encodings of the same content pass the same checksum (Debian's case)."""
    raw = idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10))
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    a.write_bytes(gzip.compress(raw, compresslevel=1))
    b.write_bytes(gzip.compress(raw, compresslevel=9, mtime=12345))
    assert a.read_bytes() != b.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    np.testing.assert_array_equal(data.read_idx(a, digest), data.read_idx(b, digest))


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "not an IDX file"),  # unknown type code
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "payload has 3 bytes.*needs 5"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02abcd", "payload has 4 bytes.*needs 2"),
    ],
)
def test_read_idx_corrupt(tmp_path, blob, match):
    path = tmp_path / "bad"
    path.write_bytes(blob)
    with pytest.raises(data.CorruptDataError, match=match):
        data.read_idx(path)


def test_read_idx_bad_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-20])  # truncated stream
    with pytest.raises(data.CorruptDataError, match="cannot decompress"):
        data.read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.CorruptDataError, match="cannot decompress"):
        data.read_idx(path)


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_idx(tmp_path / "nope.gz")


# --- loading IDX data sets ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_from_root(tmp_path, monkeypatch, gz):
    sums = fake_dataset(tmp_path / "files", gz=gz)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    x, y = data.load("mnist", "train", root=tmp_path / "files")
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.get_default_dtype()
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(12)]
    assert 0 <= x.min() and x.max() <= 1
    raw = data.read_idx(tmp_path / "files" / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(raw).to(x.dtype), rtol=0, atol=1e-4)
    xt, yt = data.load("mnist", "test", root=tmp_path / "files", dtype=torch.float64)
    assert xt.shape == (5, 1, 28, 28) and xt.dtype == torch.float64


def test_search_order(tmp_path, monkeypatch):
    """$ROBUSTREG_DATA/<name>, then the cache, then Debian's directory."""
    monkeypatch.setenv("ROBUSTREG_DATA", str(tmp_path / "env"))
    dirs = data.search_dirs("fashion-mnist")
    assert dirs == [
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "cache" / "robustreg" / "fashion-mnist",
        tmp_path / "debian" / "fashion-mnist",
    ]
    sums_debian = fake_dataset(tmp_path / "debian" / "fashion-mnist", n_train=7, seed=1)
    monkeypatch.setitem(data.CHECKSUMS, "fashion-mnist", sums_debian)
    assert data.load("fashion-mnist", "train")[0].shape[0] == 7  # found in Debian's directory
    data._idx_arrays.cache_clear()
    sums_env = fake_dataset(tmp_path / "env" / "fashion-mnist", n_train=9, seed=2)
    monkeypatch.setitem(data.CHECKSUMS, "fashion-mnist", sums_env)
    assert data.load("fashion-mnist", "train")[0].shape[0] == 9  # $ROBUSTREG_DATA wins


def test_load_corrupt_file_is_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "files"
    sums = fake_dataset(root)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    # Flip one pixel: same size, valid gzip, wrong content.
    path = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.CorruptDataError, match="checksum mismatch.*train-images.*fresh copy"):
        data.load("mnist", "train", root=root)


def test_load_missing_file_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTREG_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        data.load("fashion-mnist", "test")
    msg = str(err.value)
    for where in data.search_dirs("fashion-mnist"):
        assert str(where) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "download failed" in msg and "offline (test)" in msg
    with pytest.raises(FileNotFoundError, match="download disabled"):
        data.load("mnist", "test", download=False)


def test_download_verifies_md5_and_writes_atomically(tmp_path, monkeypatch, request):
    """A download is checked against the publisher's MD5 and lands in the cache directory."""
    files = {}
    rng = np.random.default_rng(3)
    sums = {}
    for split, n in (("train", 4), ("test", 3)):
        img, lab = data.IDX_FILES[split]
        for stem, arr in (
            (img, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            (lab, np.arange(n, dtype=np.uint8)),
        ):
            raw = idx_bytes(arr)
            files[stem + ".gz"] = gzip.compress(raw)
            sums[stem] = hashlib.sha256(raw).hexdigest()
    md5 = {stem: hashlib.md5(files[stem + ".gz"]).hexdigest() for stem in sums}
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    monkeypatch.setitem(data.GZ_MD5, "mnist", md5)

    site = tmp_path / "site"
    site.mkdir()
    for fname, blob in files.items():
        (site / fname).write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    monkeypatch.setitem(data.DOWNLOAD_URLS, "mnist", ("http://127.0.0.1:9/", url))  # 1st fails
    monkeypatch.setattr(data, "_fetch", fetch)  # pooch, not the offline stub of `isolated`
    x, y = data.load("mnist", "train")
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3]
    cached = sorted(p.name for p in (tmp_path / "cache" / "robustreg" / "mnist").iterdir())
    assert cached == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # no temp files

    # A download whose MD5 differs is rejected and nothing is written.
    monkeypatch.setitem(data.GZ_MD5, "mnist", {k: "0" * 32 for k in md5})
    data._idx_arrays.cache_clear()
    with pytest.raises(FileNotFoundError, match="MD5 differs from the publisher"):
        data.load("mnist", "test")
    assert not (tmp_path / "cache" / "robustreg" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def test_known_checksums_are_well_formed():
    for name in data.IDX_DATASETS:
        for split in data.IDX_FILES:  # the files' splits ("fit"/"val" are carved from train)
            for stem in data.IDX_FILES[split]:
                assert len(data.CHECKSUMS[name][stem]) == 64
                assert len(data.GZ_MD5[name][stem]) == 32


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_test_labels(monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", Path("/usr/share/datasets"))
    path = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    labels = data.read_idx(path, data.CHECKSUMS["fashion-mnist"]["t10k-labels-idx1-ubyte"])
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


# --- the small data sets ------------------------------------------------------------------------

EXPECTED = {
    "digits": ((1437, 1, 8, 8), (360, 1, 8, 8), 10),
    "moons": ((800, 2), (200, 2), 2),
    "mnist5k": ((4000, 1, 28, 28), (1000, 1, 28, 28), 10),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_small_datasets(name):
    train_shape, test_shape, k = EXPECTED[name]
    (x, y), (xt, yt) = data.load(name, "train"), data.load(name, "test")
    assert x.shape == train_shape and xt.shape == test_shape
    for a, b in ((x, y), (xt, yt)):
        assert a.dtype == torch.get_default_dtype() and b.dtype == torch.int64
        assert 0 <= a.min() and a.max() <= 1
        assert set(b.unique().tolist()) == set(range(k))
    # stratified: class proportions of train and test agree to within one sample
    full = torch.bincount(torch.cat([y, yt]), minlength=k).double()
    expected_test = full * len(yt) / (len(y) + len(yt))
    assert (torch.bincount(yt, minlength=k) - expected_test).abs().max() <= 1
    # the split is a partition: no test image also in train (up to exact duplicates in the data)
    if name != "moons":
        train_rows = {tuple(r.tolist()) for r in x.flatten(1)}
        overlap = sum(tuple(r.tolist()) in train_rows for r in xt.flatten(1))
        assert overlap <= 2


@pytest.mark.parametrize("name", ["digits", "moons"])
def test_deterministic_and_fresh(name):
    x1, y1 = data.load(name, "train")
    x1[0] = 7  # callers may modify what they get
    x2, y2 = data.load(name, "train")
    x3, y3 = data.load(name, "train")
    assert torch.equal(x2, x3) and torch.equal(y2, y3) and not torch.equal(x1, x2)


def test_scalings():
    x, _ = data.load("digits", "train", dtype=torch.float64)
    assert torch.equal(x * 16, (x * 16).round())  # v/16 of integers 0..16
    assert x.max() == 1.0
    m, _ = data.load("moons", "train", dtype=torch.float64)
    mt, _ = data.load("moons", "test", dtype=torch.float64)
    both = torch.cat([m, mt])
    assert both.min(0).values.tolist() == [0.0, 0.0]
    assert both.max(0).values.tolist() == [1.0, 1.0]


def test_mnist5k_balanced_and_pinned():
    _, y = data.load("mnist5k", "train")
    xt, yt = data.load("mnist5k", "test", dtype=torch.float64)
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(yt).tolist() == [100] * 10
    assert torch.equal(xt * 255, (xt * 255).round())
    # the fixed split: checksum of the test labels' order
    assert hashlib.sha256(yt.numpy().tobytes()).hexdigest()[:16] == MNIST5K_TEST_LABELS


MNIST5K_TEST_LABELS = "e60b9553bec95257"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown data set 'mnsit'; valid: digits, moons"):
        data.load("mnsit")
    with pytest.raises(
        ValueError, match=r"unknown split 'validation'; valid: train, test, fit, val"
    ):
        data.load("digits", "validation")
    with pytest.raises(ValueError, match="floating dtype"):
        data.load("digits", dtype=torch.int64)
    assert data.names() == data.DATASETS
