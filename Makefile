# stainmil — the commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# torch and torchvision are pinned as a matching pair from the registry (a local +cpu torch wheel of another
# build would shadow it and break torchvision); installed before the package so pip never picks another build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# the viewer's deep-zoom client, from npm at a pinned version (stainmil.view.app.OPENSEADRAGON_VERSION)
OPENSEADRAGON ?= 6.1.1
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stainmil-installed

.PHONY: setup test test-fast demo docs lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	npm install --silent --no-audit --no-fund --prefix $(VENV)/share/stainmil openseadragon@$(OPENSEADRAGON)
	touch $(STAMP)

# Everything CI must run. The SLURM tests share one real single-node cluster and spend most of their time waiting
# on its scheduler: they run as a second pytest beside the parallel pass (their output kept in .slurm-tests.log and
# shown after it); make test fails if either does, and Ctrl-C stops both.
# --dist worksteal: a worker that runs out of tests takes queued ones from the other, so neither idles while the
# other still has several queued (`load` fixes each worker's queue up front).
test: setup
	@$(BIN)/python -m pytest -m slurm -p no:xdist --durations=5 > .slurm-tests.log 2>&1 & slurm=$$!; \
	trap 'kill $$slurm 2>/dev/null; exit 130' INT TERM; \
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slurm" --durations=15; parallel=$$?; \
	wait $$slurm; slurm_status=$$?; echo "---- the SLURM tests (run beside the parallel pass) ----"; \
	cat .slurm-tests.log; test $$parallel -eq 0 && test $$slurm_status -eq 0

# The quick loop while developing: no end-to-end pipelines, benchmarks or SLURM (CI runs `make test`).
test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not slurm and not slow"

demo: setup
	$(BIN)/stainmil demo --out demo_out

# the documentation site (docs/ + reference pages generated from the code) -> site/; --strict: a broken link fails
docs: setup
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/stainmil bench training --preset demo

clean:
	rm -rf $(VENV) demo_out site .pytest_cache
