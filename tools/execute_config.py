"""Print _config.yml with execution switched on, for `make book`.

The committed `_config.yml` builds from the committed outputs (`execute_notebooks: "off"`);
`make book` builds with this variant instead: Jupyter Book executes every chapter at its default
parameters through jupyter-cache into `_build/` (re-executing only what changed since the last
build) and leaves the notebooks in `book/` untouched.
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

config = yaml.safe_load((ROOT / "_config.yml").read_text())
config["execute"] = {
    "execute_notebooks": "cache",
    "cache": str(ROOT / "_build" / ".jupyter_cache"),
    "timeout": -1,  # the chapters take minutes; no cell limit
    "allow_errors": False,  # a failing check fails the build
    "run_in_temp": False,  # the chapters read ../results relative to book/
}
# local extensions are found relative to the config file, which this one is not beside
extensions = config.get("sphinx", {}).get("local_extensions") or {}
for name, path in extensions.items():
    extensions[name] = str(ROOT / path)
yaml.safe_dump(config, sys.stdout, sort_keys=False, allow_unicode=True)
