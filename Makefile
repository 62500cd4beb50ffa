# moewidgets — set up, open, test and build the course.  GNU make; works as root and non-root.
#
#   make lab        create .venv if missing, install, open JupyterLab on the book (127.0.0.1, token kept)
#   make test       unit + packaging + browser tests, nbval on the book, book build with warnings as errors
#   make book       build the HTML book (notebooks executed) into book/_build/html
#   make bench      run the benchmarks (bench/)
#   make reproduce  the claim runs of every chapter (resumable) -> book/results/chapterN.jsonl
#   make app        serve the chapter dashboards with Voila on 127.0.0.1:8866, one kernel per page load
#   make figures    retrain the grids of the book's kernel-free figures -> book/_extra/figures/
#   make clean      remove build outputs and caches (keeps the venv);  make distclean: also the venv
#
# Overridable:  VENV=.venv  PYTHON=python3  TORCH_SPEC='torch==2.13.0'  MOEWIDGETS_DATA=/path/to/data
# A bare `torch` on x86_64 resolves to a multi-GB CUDA build; the default pins the CPU wheel.
# For a CUDA build:  TORCH_SPEC='torch' make install

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= lab,book,test,hf,app,dist

# The data folder (WikiText-2, chapter 2 on): the environment wins, else ../shared/data if it exists.
ifndef MOEWIDGETS_DATA
ifneq ($(wildcard ../shared/data),)
MOEWIDGETS_DATA := $(abspath ../shared/data)
endif
endif
ifdef MOEWIDGETS_DATA
export MOEWIDGETS_DATA
endif

# JupyterLab refuses to run as root without --allow-root; add it only then.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
BOOK_BUILD = $(VENV)/bin/jupyter-book build book/ --config jupyter_book_config.yml
# Start of this make invocation, for the wall time that `make test` prints.
T0 := $(shell date +%s)

.PHONY: help install lab test book bench reproduce app figures figures-html clean distclean

help:
	@sed -n '2,11p' Makefile | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------------------------------------
# Install: torch FIRST (TORCH_SPEC), then the package with the CI pins. Re-runs only when
# pyproject.toml or constraints.txt change (or the stamp is removed).
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	@mkdir -p $(LAB_SETTINGS)
	@printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
		> $(LAB_SETTINGS)/overrides.json
	@touch $@

install: $(VENV)/.installed

# ---------------------------------------------------------------------------------------------
lab: install
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --ServerApp.root_dir=book $(ALLOW_ROOT) \
		$(wildcard book/chapter1.ipynb)

# ---------------------------------------------------------------------------------------------
# Stops at the first failing step; prints each step's and the whole run's wall time.
test: install
	@step() { local name=$$1 t=$$(date +%s); shift; echo; echo "==> $$name: $$*"; \
		"$$@" || return $$?; echo "<== $$name: ok in $$(( $$(date +%s) - t )) s"; }; \
	rc=0; { \
		step "figures" $(MAKE) --no-print-directory figures-html && \
		step "pytest tests" $(PY) -m pytest tests && \
		step "nbval" $(PY) -m pytest --nbval --nbval-current-env book/ --ignore=book/_build \
			--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider && \
		step "book build" $(BOOK_BUILD) -W -n --keep-going ; \
	} || rc=$$?; \
	echo; echo "make test: $$( [ $$rc -eq 0 ] && echo PASSED || echo "FAILED (exit $$rc)" )," \
		"wall $$(( $$(date +%s) - $(T0) )) s (including the install check)"; \
	exit $$rc

# ---------------------------------------------------------------------------------------------
book: install figures-html
	$(BOOK_BUILD)
	@echo "HTML: book/_build/html/index.html"

bench: install
	$(PY) -m bench.run

reproduce: install
	$(PY) -m moewidgets reproduce chapter1
	$(PY) -m moewidgets reproduce chapter2
	$(PY) -m moewidgets reproduce chapter3
	$(PY) -m moewidgets reproduce chapter4

# ---------------------------------------------------------------------------------------------
# Classroom mode (app/README.md): the chapter dashboards as web pages, a fresh kernel per page load. The offline
# template drops Voila's CDN stylesheet links; a closed page's kernel is culled after APP_CULL_S idle seconds;
# Voila prints the URL with a fresh token.
APP_PORT ?= 8866
APP_IP ?= 127.0.0.1
APP_CULL_S ?= 600
app: install
	JUPYTER_PATH=$(abspath app/.jupyter-path) $(VENV)/bin/voila app --template=offline --no-browser \
		--Voila.ip=$(APP_IP) --port=$(APP_PORT) --Voila.port_retries=0 --token \
		--MappingKernelManager.cull_idle_timeout=$(APP_CULL_S) --MappingKernelManager.cull_interval=60

figures: install
	$(PY) tools/make_static_figures.py

# The built book's figure pages (book/_extra/figures/*.html, not committed: 1.6 MB of inline BokehJS each), rendered
# in seconds from the committed grid data (book/_extra/figures/*.json) and benchmark results (bench/results/*.json).
figures-html: install
	$(PY) tools/make_static_figures.py --render-only
	$(PY) tools/make_performance_figure.py

# ---------------------------------------------------------------------------------------------
clean:
	rm -rf book/_build build .pytest_cache .cache *.egg-info bench/results/*.tmp
	find . -path './$(VENV)' -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -o -name .ipynb_checkpoints -o -name .pytest_cache \) -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
