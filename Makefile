# Two commands on a fresh machine:  `make book`  (execute every chapter and build the HTML)
#                                  `make test`  (everything CI checks)
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
CHAPTERS = $(shell $(PY) tools/chapters.py)
export PYTHONHASHSEED := 0
export OMP_NUM_THREADS := 2

.PHONY: book html reproduce test lint unit smoke nbval nbval-portable reproduction reruns browser bench clean venv

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this machine serves the CPU wheel of 2.13.0 (a newer one pulls CUDA).
	# Elsewhere set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to take the CPU wheel from there.
	$(PY) -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e ".[dev]"
	# AutoAttack's standard components; its declared dependencies would pull torchvision
	$(PY) -m pip install --quiet --no-deps "torchattacks==3.5.1"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (robustreg)" >/dev/null
	@touch $@

## make book: execute every chapter at its default parameters into _build/ (Jupyter Book's
## jupyter-cache), then build the HTML from those executions. The checkout is left untouched.
book: $(VENV_STAMP)
	@mkdir -p _build
	$(PY) tools/execute_config.py > _build/_config_execute.yml
	.venv/bin/jupyter-book build . --config _build/_config_execute.yml -W -n --keep-going
	@echo "Open $(CURDIR)/_build/html/index.html"

## make reproduce (maintainers): re-run every chapter in place with papermill (default profile),
## refreshing the committed outputs; commit them afterwards.
reproduce: $(VENV_STAMP)
	@for nb in $(CHAPTERS); do \
	  echo "== executing $$nb"; \
	  $(PY) -m papermill "$$nb" "$$nb" --cwd book -k python3 --progress-bar || exit 1; \
	  $(PY) tools/strip_notebooks.py "$$nb" || exit 1; \
	done

## make html: build the book from the committed outputs (no execution).
html: $(VENV_STAMP)
	.venv/bin/jupyter-book build . -W -n --keep-going
	@echo "Open $(CURDIR)/_build/html/index.html"

## make test: everything CI checks, with a time per stage.
test: $(VENV_STAMP)
	bash tools/test_stages.sh

lint: $(VENV_STAMP)
	$(PY) -m ruff check src tests tools benchmarks book
	$(PY) -m ruff format --check src tests tools benchmarks book
	.venv/bin/actionlint .github/workflows/*.yml

unit: $(VENV_STAMP)
	$(PY) -m pytest tests -q

## make smoke: every chapter at its seconds-long profile, with a seed other than the published one.
SMOKE_SEED ?= 1
smoke: $(VENV_STAMP)
	@mkdir -p _build/smoke
	@for nb in $(CHAPTERS); do \
	  echo "== smoke $$nb"; \
	  $(PY) -m papermill "$$nb" "_build/smoke/$$(basename $$nb)" -p profile smoke -p seed $(SMOKE_SEED) --cwd book -k python3 --no-progress-bar || exit 1; \
	done

nbval: $(VENV_STAMP)
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-kernel-name python3 \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider -q $(CHAPTERS)

## make nbval-portable: nbval again under another instruction set and thread count than the first
## pass (the committed outputs must not depend on either).
nbval-portable: $(VENV_STAMP)
	ATEN_CPU_CAPABILITY=default ROBUSTREG_THREADS=2 OMP_NUM_THREADS=2 $(MAKE) --no-print-directory nbval

## make reproduction: retrain three committed runs (plain, a regularizer with its estimator,
## adversarial training) and compare their metrics with the committed result files.
REPRODUCE_RUNS ?= plain_seed0 jacobian_frobenius_lam0.1_seed0 adversarial_seed0
reproduction: $(VENV_STAMP)
	$(PY) -m robustreg reproduce-results results/default $(REPRODUCE_RUNS) --quiet

## make reruns: the property tests at 400 random architectures each, then every chapter at its
## default profile with seeds 1–5 and at its full profile (what readers rerun; about an hour).
reruns: $(VENV_STAMP)
	HYPOTHESIS_PROFILE=full $(PY) -m pytest tests/test_facts.py tests/test_geometry.py -q
	$(PY) tools/reruns.py

browser: $(VENV_STAMP)
	$(PY) tools/browser_check.py _build/html _build/screenshots

bench: $(VENV_STAMP)
	$(PY) benchmarks/regularizer_cost.py

clean:
	rm -rf _build
