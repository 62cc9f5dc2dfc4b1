"""The module layout stays readable: no private names across modules, imports at the top, one
definition of the profiles, and no copy of the training block in the chapters."""

import ast
import json
from pathlib import Path

import robustreg
from robustreg import experiments, notebook, profiles

SRC = Path(robustreg.__file__).parent
ROOT = SRC.parents[1]
MODULES = {p.stem for p in SRC.glob("*.py")}

#: Imports that may sit inside a function: optional dependencies (deferred so that the package
#: imports with torch and numpy alone) and the CLI, which must set the numeric environment before
#: torch loads.
DEFERRED = {
    "art",
    "matplotlib",
    "mlxtend",
    "pandas",
    "safetensors",
    "sklearn",
    "torchattacks",
    "tqdm",
}


def _trees():
    for path in sorted(SRC.glob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_module_uses_another_modules_private_names():
    offences = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in MODULES
                and node.value.id != path.stem
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offences.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustreg"):
                offences += [
                    f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and node.module != "__future__"
                ]
    assert not offences, offences


def test_imports_inside_functions_only_defer_optional_dependencies():
    offences = []
    for path, tree in _trees():
        if path.name == "__main__.py":
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                offences += [
                    f"{path.name}:{node.lineno} {n}"
                    for n in names
                    if n.split(".")[0] not in DEFERRED
                ]
    assert not offences, offences


def test_one_definition_of_the_profiles():
    assert experiments.PROFILES is profiles.PROFILES
    assert notebook.PROFILES is profiles.PROFILES
    main = (SRC / "__main__.py").read_text()
    assert '"smoke", "default", "full"' not in main and "choices=list(PROFILES)" in main


def test_chapters_train_through_the_library():
    """The digits network of chapters 02–07 comes from runs.digits_mlp, not from a copied
    training block; no chapter calls training.train on the digits data itself."""
    for path in sorted((ROOT / "book").glob("0[2-7]_*.ipynb")):
        code = "\n".join(
            "".join(c["source"])
            for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "code"
        )
        assert "runs.digits_mlp(" in code, path.name
        assert "training.train(" not in code, path.name
        assert 'data.load("digits", "train")' not in code, path.name
