"""The module layout stays readable: no private names across modules, imports at the top, one
definition of the profiles, the experiment layer above the core and never below it, one module per
concept named in the README, and no copy of the training block in the chapters."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import robustreg
from robustreg import notebook, study
from robustreg.study import config

SRC = Path(robustreg.__file__).parent
ROOT = SRC.parents[1]
PATHS = sorted(SRC.rglob("*.py"))
MODULES = {p.stem for p in PATHS if p.stem != "__init__"} | {"study"}
#: The core: formulas and their checks. It must not depend on the experiment layer.
CORE = ("models", "geometry", "regularizers", "conventions", "reference", "attacks", "verification")

#: Imports that may sit inside a function: optional dependencies (deferred so that the package
#: imports with torch and numpy alone) and the CLI, which must set the numeric environment before
#: torch loads.
DEFERRED = {
    "IPython",  # a notebook's (notebook.html_table, plotting.use_book_style)
    "art",
    "cycler",  # matplotlib's
    "matplotlib",
    "matplotlib_inline",  # a notebook's
    "mlxtend",
    "myst_nb",  # a notebook's (notebook.glue_md)
    "pandas",
    "pooch",
    "safetensors",
    "sklearn",
    "submitit",
    "torchattacks",
    "tqdm",
}


def _trees():
    for path in PATHS:
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
                    if a.name.startswith("_")
                    and not a.name.startswith("__")  # __version__ is public
                    and node.module != "__future__"
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
    assert study.PROFILES is config.PROFILES
    assert notebook.PROFILES is config.PROFILES
    main = (SRC / "__main__.py").read_text()
    assert '"smoke", "default", "full"' not in main and "choices=list(PROFILES)" in main


def test_the_profiles_load_without_torch():
    """The command line reads the profiles before it sets the numeric environment torch reads."""
    code = "import sys; from robustreg.study import PROFILES; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_core_does_not_depend_on_the_experiment_layer():
    offences = []
    for path, tree in _trees():
        if path.parent != SRC or path.stem not in CORE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "robustreg.study"
            ):
                offences.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "robustreg":
                offences += [f"{path.name}:{node.lineno}" for a in node.names if a.name == "study"]
    assert not offences, offences


def test_one_module_per_concept_each_named_in_its_docstring_and_the_readme():
    assert not (SRC / "experiments.py").exists() and not (SRC / "runs.py").exists()
    readme = (ROOT / "README.md").read_text()
    for path in PATHS:
        if path.name in ("__init__.py", "__main__.py") or path.stem.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{path} states no concept"
        name = path.relative_to(SRC).with_suffix("").as_posix()  # e.g. geometry, study/cache
        assert f"| `{name}` |" in readme, f"README's table of modules misses {name}"
    for name in study.SUBMODULES:
        assert (SRC / "study" / f"{name}.py").is_file()


def test_the_command_line_and_chapters_use_the_study_packages_public_names():
    offences = []
    sources = [(SRC / "__main__.py", (SRC / "__main__.py").read_text())]
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources.append(
            (path, "\n".join(l for l in code.splitlines() if not l.startswith(("%", "!"))))
        )
    for path, code in sources:
        for node in ast.walk(ast.parse(code)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Attribute | ast.Name)
                and ast.unparse(node.value).split(".")[-1] in {*study.SUBMODULES, "study"}
            ):
                offences.append(f"{path.name}: {ast.unparse(node)}")
        assert "robustreg.experiments" not in code and "robustreg.runs" not in code, path.name
    assert not offences, offences


def test_chapters_train_through_the_library():
    """The digits network of chapters 02–07 comes from cache.digits_mlp, not from a copied
    training block; no chapter calls training.train on the digits data itself."""
    for path in sorted((ROOT / "book").glob("0[2-7]_*.ipynb")):
        code = "\n".join(
            "".join(c["source"])
            for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "code"
        )
        assert "cache.digits_mlp(" in code, path.name
        assert "training.train(" not in code, path.name
        assert 'data.load("digits", "train")' not in code, path.name


def test_one_tolerance_rule_for_the_tests_and_the_chapters():
    """The tests and the chapters decide identities by robustreg.checks alone: no test module or
    chapter defines a rule of its own."""
    rules = {"assert_identity", "assert_leq", "rel_err", "relative_error", "scaled_error"}
    offences = []
    sources = [(p.name, p.read_text()) for p in sorted((ROOT / "tests").glob("*.py"))]
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources.append((path.name, "\n".join(l for l in code.splitlines() if l[:1] not in "%!")))
    for name, code in sources:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.FunctionDef) and node.name in rules:
                offences.append(f"{name}: def {node.name}")
    assert not offences, offences


def test_one_norms_table_one_dual_norm_one_set_of_argument_checks():
    """robustreg.validation holds the norms (name → dual exponent), the dual norm and the checks;
    a module that accepts some norms names them from that table; no module re-implements a check,
    the dual norm or the activation tracer (MMR uses geometry's)."""
    from robustreg import validation

    banned = {
        "_dual",
        "_dual_norm",
        "_check_batch",
        "_check_x",
        "_check_y",
        "_check_norm",
        "_check_count",
        "_check_generator",
        "_check_positive",
        "_check_logits",
        "_check_label_values",
        "_preactivations",
    }
    offences = []
    for path, tree in _trees():
        if path.stem == "reference":  # the independent references share nothing on purpose
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in banned:
                offences.append(f"{path.name}: def {node.name}")
            if (
                isinstance(node, ast.Assign)
                and path.stem != "validation"
                and any(isinstance(t, ast.Name) and t.id.endswith("NORMS") for t in node.targets)
            ):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:  # not literal names (e.g. models.BATCH_NORMS, layer types)
                    continue
                if not (isinstance(value, tuple) and set(value) <= set(validation.NORMS)):
                    offences.append(f"{path.name}:{node.lineno} a norms table of its own")
    assert not offences, offences


def test_the_api_reference_documents_every_module():
    api = (ROOT / "book" / "api.md").read_text()
    for path in PATHS:
        if path.name == "__main__.py" or path.stem.startswith("_"):
            continue
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        if name == "robustreg":
            continue
        assert f".. automodule:: {name}\n" in api, f"book/api.md does not document {name}"
