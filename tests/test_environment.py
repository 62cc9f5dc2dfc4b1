"""The two install paths (pip from pyproject.toml, conda from environment.yml) install the same."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _normalized(specs):
    out = {}
    for spec in specs:
        req = Requirement(spec)
        out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def _pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    dev = [s for s in extras["dev"] if not s.startswith("robustreg[")]
    return _normalized(project["dependencies"] + extras["experiments"] + dev)


def _environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return _normalized([s for s in pip if not s.startswith("-e")])


def test_environment_yml_matches_pyproject():
    py, env = _pyproject(), _environment()
    assert set(py) == set(env), (
        f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    )
    differing = {name: (py[name], env[name]) for name in py if py[name] != env[name]}
    assert not differing, f"version specifiers differ (pyproject, environment.yml): {differing}"


def _constraints():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {Requirement(s).name: Requirement(s) for s in lines if s and not s.startswith("#")}


def test_torch_is_a_range_and_ci_pins_the_cpu_wheel():
    """A reader's torch within the range is kept; CI installs constraints.txt's exact version,
    which the range must admit."""
    torch_range = Requirement(f"torch{_pyproject()['torch']}").specifier
    pinned = _constraints()["torch"]
    assert str(pinned.specifier) == "==2.13.0"
    assert "2.13.0" in torch_range and "2.14.0" in torch_range and "2.2.0" not in torch_range
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_the_package_needs_only_torch_and_numpy():
    """`pip install robustreg` brings what the regularizers need; the rest is an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(_normalized(project["dependencies"])) == {"torch", "numpy"}
    assert "robustreg[experiments]" in project["optional-dependencies"]["dev"]


def test_one_version_everywhere():
    """The version lives in robustreg.__version__; pyproject reads it, CITATION.cff and the
    changelog name it."""
    import robustreg

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == robustreg.__version__
    assert f"## {robustreg.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    book = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert book["parse"]["myst_substitutions"]["version"] == robustreg.__version__
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_binder_installs_the_runtime_only():
    """.binder/requirements.txt: the package's runtime and experiment dependencies with
    pyproject's specifiers, what the chapters import to glue their numbers, no development tools."""
    lines = (ROOT / ".binder" / "requirements.txt").read_text().splitlines()
    binder = _normalized([s for s in lines if s and not s.startswith(("#", "-"))])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _normalized(project["dependencies"] + project["optional-dependencies"]["experiments"])
    runtime["torch"] = str(_constraints()["torch"].specifier)  # Binder takes CI's exact torch
    assert {k: binder.get(k) for k in runtime} == runtime
    assert set(binder) - set(runtime) == {"myst-nb", "papermill"}
    assert "download.pytorch.org/whl/cpu" in (ROOT / ".binder" / "requirements.txt").read_text()
    assert "pip install --no-deps -e ." in (ROOT / ".binder" / "postBuild").read_text()


def test_the_repository_url_is_set_once_and_followed():
    book = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = book["repository"]["url"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert all(v.startswith(url) for v in project["urls"].values()), project["urls"]
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["repository-code"] == url
    assert book["launch_buttons"]["colab_url"] and book["launch_buttons"]["binderhub_url"]
