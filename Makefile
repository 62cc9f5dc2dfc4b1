# Two commands on a fresh machine:  `make book`  (execute every chapter and build the HTML)
#                                  `make test`  (everything CI checks)
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
CHAPTERS = $(shell $(PY) tools/chapters.py)
export PYTHONHASHSEED := 0
export OMP_NUM_THREADS := 2
# Threads that wait for work sleep instead of spinning: two processes of two threads each on two
# cores then run side by side (spinning threads made them several times slower). Numbers unchanged.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: book html reproduce test lint unit smoke nbval nbval-portable reproduction reader reruns browser bench clean venv

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, at constraints.txt's version: this machine serves its CPU wheel (a newer one pulls CUDA).
	# Elsewhere set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to take the CPU wheel from there.
	$(PY) -m pip install --quiet -c constraints.txt torch $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# AutoAttack's standard components; its declared dependencies would pull torchvision
	$(PY) -m pip install --quiet --no-deps -c constraints.txt torchattacks
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (robustreg)" >/dev/null
	@touch $@

## make book: execute every chapter at its default parameters into _build/ (Jupyter Book's
## jupyter-cache, two chapters at a time), then build the HTML from those executions. The
## checkout is left untouched.
book: $(VENV_STAMP)
	@mkdir -p _build
	$(PY) tools/execute_config.py > _build/_config_execute.yml
	$(PY) tools/execute_parallel.py _build/.jupyter_cache
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

## make reader: a theory and an experimental chapter run outside the checkout, from the wheel,
## the experimental one with its results fetched from a release asset (tools/reader_stage.sh).
reader: $(VENV_STAMP)
	bash tools/reader_stage.sh

lint: $(VENV_STAMP)
	$(PY) -m ruff check src tests tools benchmarks book
	$(PY) -m ruff format --check src tests tools benchmarks book
	.venv/bin/actionlint .github/workflows/*.yml
	.venv/bin/cffconvert --validate -i CITATION.cff

## Stages run JOBS processes side by side (one thread each unless said otherwise): small networks
## on one thread are nearly as fast as on two, so two processes use the two cores.
JOBS ?= 2

unit: $(VENV_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -n $(JOBS) --dist worksteal

## make smoke: every chapter at its seconds-long profile, with a seed other than the published one.
SMOKE_SEED ?= 1
smoke: $(VENV_STAMP)
	ROBUSTREG_THREADS=1 OMP_NUM_THREADS=1 $(PY) tools/reruns.py --profiles smoke --seeds $(SMOKE_SEED) --jobs $(JOBS) --out _build/smoke

## make nbval: every chapter's checked outputs against the committed ones, natively at one thread
## per chapter, JOBS chapters at a time (the longest, 08, first).
NBVAL_THREADS ?= 1
NBVAL_ORDER = $(filter book/08_%,$(CHAPTERS)) $(filter-out book/08_%,$(CHAPTERS))
nbval: $(VENV_STAMP)
	ROBUSTREG_THREADS=$(NBVAL_THREADS) OMP_NUM_THREADS=$(NBVAL_THREADS) \
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-kernel-name python3 \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider -q \
	  -n $(JOBS) --dist loadfile $(NBVAL_ORDER)

## make nbval-portable: nbval again under another instruction set (ATen's portable kernels) and
## another thread count (two) than the first pass: the committed outputs depend on neither. JOBS
## chapters at a time, two threads each (OMP_WAIT_POLICY=PASSIVE above keeps them from spinning).
nbval-portable: $(VENV_STAMP)
	ATEN_CPU_CAPABILITY=default $(MAKE) --no-print-directory nbval NBVAL_THREADS=2

## make reproduction: retrain committed runs (plain, a regularizer with its estimator, adversarial
## training; a converged network, 60 epochs of Fashion-MNIST) and compare their metrics with the
## committed result files (results/<dir>/<run>.json), JOBS at a time, the longest first.
REPRODUCE_RUNS ?= converged/plain_seed1 default/plain_seed0 default/jacobian_frobenius_lam0.1_seed0 default/adversarial_seed0
reproduction: $(VENV_STAMP)
	printf '%s\n' $(REPRODUCE_RUNS) | xargs -P $(JOBS) -I RUN sh -c '$(PY) -m robustreg reproduce-results results/$$(dirname RUN) $$(basename RUN) --quiet'

## make reruns: the property tests at 400 random architectures each, then every chapter at its
## default profile with seeds 1–5 and at its full profile (what readers rerun; about an hour).
reruns: $(VENV_STAMP)
	HYPOTHESIS_PROFILE=full $(PY) -m pytest tests/test_facts.py tests/test_geometry.py -q
	$(PY) tools/reruns.py

browser: $(VENV_STAMP)
	$(PY) tools/browser_check.py _build/html _build/screenshots

bench: $(VENV_STAMP)
	$(PY) benchmarks/regularizer_cost.py
	$(PY) benchmarks/certificate_cost.py --with-forward-mode

clean:
	rm -rf _build
