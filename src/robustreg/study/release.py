"""The published results outside a checkout: one release asset, named in one place, fetched with
pooch and verified by its SHA-256.

:func:`robustreg.study.store.results_root` looks for the published results (the result files
and weights of ``results/``) in this order:

1. ``$ROBUSTREG_RESULTS``, a directory holding them (an explicit choice wins);
2. the ``results/`` folder of the checkout the package runs from (``src/robustreg`` beside it);
3. the release asset :data:`RESULTS_ASSET` of this edition (``$ROBUSTREG_RESULTS_URL`` and
   ``$ROBUSTREG_RESULTS_SHA256`` name another, e.g. a mirror), downloaded once into
   :func:`cache_dir`, checked and unpacked by pooch.

With no network, step 3 fails with an error that names the file to fetch, its checksum and where
to put it. :func:`build_asset` writes the asset from a ``results/`` folder, byte for byte the same
for the same files (sorted members, no timestamps or owners), so its SHA-256 identifies the
results; ``python tools/results_asset.py`` prints it for a release.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from robustreg import __version__, files
from robustreg.extras import require

__all__ = ["RESULTS_ASSET", "build_asset", "cache_dir", "fetch_results"]

#: This edition's results asset: where the release publishes it and its SHA-256 (None until the
#: edition is released: then only steps 1 and 2 of the module docstring find results).
RESULTS_ASSET = {
    "url": (
        f"https://github.com/robustreg/robustreg/releases/download/v{__version__}/"
        f"results-{__version__}.tar.gz"
    ),
    "sha256": None,
}


def cache_dir() -> Path:
    """Where fetched assets are kept: ``$ROBUSTREG_CACHE/releases`` or
    ``~/.cache/robustreg/releases``."""
    base = os.environ.get("ROBUSTREG_CACHE") or Path.home() / ".cache" / "robustreg"
    return Path(base) / "releases"


def _members(results: Path) -> list[Path]:
    """The files of ``results`` the asset packs: none hidden, nor any under a hidden folder (a
    study's ``.checkpoints/``, the resume state of its runs in progress)."""
    return sorted(
        p
        for p in results.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(results).parts)
    )


def build_asset(results_dir: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write ``results_dir`` as a gzipped tar whose members are ``results/<relative path>``
    (sorted; mtime, owner and mode fixed), atomically, and return its SHA-256."""
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no results directory to pack")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _members(results):
                info = tarfile.TarInfo(f"results/{path.relative_to(results).as_posix()}")
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with path.open("rb") as f:
                    tar.addfile(info, f)
    data = buffer.getvalue()
    files.atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def fetch_results() -> Path:
    """The results of this edition's release asset (module docstring, step 3): downloaded once,
    verified, unpacked; returns the unpacked ``results/`` directory."""
    url = os.environ.get("ROBUSTREG_RESULTS_URL") or RESULTS_ASSET["url"]
    sha256 = os.environ.get("ROBUSTREG_RESULTS_SHA256") or RESULTS_ASSET["sha256"]
    where = (
        "set ROBUSTREG_RESULTS to a directory holding the results/ folder of the repository "
        f"(a clone of it, or the release asset {url} unpacked)"
    )
    if sha256 is None:
        raise FileNotFoundError(
            f"no published results: the package does not run from a checkout, and the results "
            f"asset of edition {__version__} is not released yet; {where}"
        )
    require("pooch", "fetching the published results")
    import pooch

    name = url.rsplit("/", 1)[-1]
    target = cache_dir() / sha256[:16]
    try:
        pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}",
            fname=name,
            path=target,
            processor=pooch.Untar(extract_dir="unpacked"),
            progressbar=False,
        )
    except ValueError as err:  # pooch: the checksum does not match
        raise ValueError(f"{url}: {err}; delete {target} and retry, or {where}") from None
    except Exception as err:  # no network, no such file, a proxy: say what to fetch
        raise FileNotFoundError(
            f"could not fetch the published results ({type(err).__name__}: {err}). Download "
            f"{url} (SHA-256 {sha256}) and unpack it, then {where}"
        ) from None
    return target / "unpacked" / "results"
