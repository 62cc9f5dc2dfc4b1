"""robustreg.study.release: the published results found outside a checkout, byte-identical assets,
checksums verified, and errors that say what to fetch."""

import functools
import hashlib
import http.server
import threading

import pytest

from robustreg.study import release, store

pytest.importorskip("pooch")


def _results(root):
    (root / "default").mkdir(parents=True)
    (root / "default" / "plain_seed0.json").write_text('{"name": "plain_seed0.json"}\n')
    (root / "sweep" / "masking").mkdir(parents=True)
    (root / "sweep" / "masking" / "plain_seed0.json").write_bytes(b"\x00\x01")
    return root


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on localhost (pooch downloads over HTTP)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_asset_is_byte_identical_for_the_same_files(tmp_path):
    results = _results(tmp_path / "results")
    a = release.build_asset(results, tmp_path / "a.tar.gz")
    (results / "default" / "plain_seed0.json").touch()  # a new mtime changes nothing
    b = release.build_asset(results, tmp_path / "b.tar.gz")
    assert a == b == hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest()
    # the resume state of runs in progress (a hidden folder) and hidden files are not packed
    (results / "default" / ".checkpoints").mkdir()
    (results / "default" / ".checkpoints" / "k.partial.pt").write_bytes(b"\x00")
    (results / "default" / ".hidden").write_bytes(b"\x00")
    assert release.build_asset(results, tmp_path / "d.tar.gz") == a
    (results / "default" / "plain_seed0.json").write_text("{}\n")
    assert release.build_asset(results, tmp_path / "c.tar.gz") != a


def test_results_root_fetches_and_verifies_the_asset(tmp_path, served, monkeypatch):
    site, url = served
    sha = release.build_asset(_results(tmp_path / "results"), site / "results-x.tar.gz")
    monkeypatch.delenv("ROBUSTREG_RESULTS", raising=False)
    monkeypatch.setenv("ROBUSTREG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTREG_RESULTS_URL", f"{url}/results-x.tar.gz")
    monkeypatch.setenv("ROBUSTREG_RESULTS_SHA256", sha)
    root = release.fetch_results()
    assert (root / "default" / "plain_seed0.json").read_text() == '{"name": "plain_seed0.json"}\n'
    assert (root / "sweep" / "masking" / "plain_seed0.json").read_bytes() == b"\x00\x01"
    # a wrong checksum is refused
    monkeypatch.setenv("ROBUSTREG_RESULTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA256|hash"):
        release.fetch_results()
    # no such file (or no network): the error says what to fetch and where to put it
    monkeypatch.setenv("ROBUSTREG_RESULTS_URL", f"{url}/missing.tar.gz")
    monkeypatch.setenv("ROBUSTREG_RESULTS_SHA256", "1" * 64)
    with pytest.raises(FileNotFoundError, match="Download .*missing.tar.gz.*ROBUSTREG_RESULTS"):
        release.fetch_results()


def test_results_root_order(tmp_path, monkeypatch):
    # an explicit directory wins, and must exist
    monkeypatch.setenv("ROBUSTREG_RESULTS", str(tmp_path))
    assert store.results_root() == tmp_path
    monkeypatch.setenv("ROBUSTREG_RESULTS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        store.results_root()
    # in this checkout: its results/
    monkeypatch.delenv("ROBUSTREG_RESULTS")
    assert store.results_root().name == "results" and (store.results_root() / "default").is_dir()


def test_an_unreleased_edition_says_how_to_point_at_results(monkeypatch):
    monkeypatch.delenv("ROBUSTREG_RESULTS_URL", raising=False)
    monkeypatch.delenv("ROBUSTREG_RESULTS_SHA256", raising=False)
    monkeypatch.setitem(release.RESULTS_ASSET, "sha256", None)
    with pytest.raises(FileNotFoundError, match="not released yet; set ROBUSTREG_RESULTS"):
        release.fetch_results()
