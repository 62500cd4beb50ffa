# moewidgets — set up, open, test and build the course.  GNU make; works as root and non-root.
#
#   make lab        create .venv if missing, install, open JupyterLab on the book (127.0.0.1, token kept)
#   make test       install check, Chromium check, pytest on every core (book build + offline book, unit,
#                   doctests, nbval, untimed browser tests), then the timed browser tests
#   make book       build the HTML book from the committed notebook outputs into book/_build/html
#   make notebooks  jupytext --sync book/*.md, then execute every book notebook (tools/execute_notebook.py)
#   make bench      run the benchmarks (bench/)
#   make reproduce  the claim runs of every chapter (resumable, SEEDS=10) -> book/results/chapterN.jsonl (committed)
#   make app        serve the chapter dashboards with Voila on 127.0.0.1:8866, one kernel per page load
#   make figures    retrain the grids of the book's kernel-free figures -> book/_extra/figures/
#   make lock       regenerate constraints.txt from pyproject.toml (uv pip compile, all extras, Python 3.11)
#   make clean      remove build outputs and caches (keeps the venv);  make distclean: also the venv
#
# Overridable:  VENV=.venv  PYTHON=python3  MOEWIDGETS_DATA=/path/to/data  TORCH_SPEC  TORCH_INDEX
# PyTorch is installed FIRST (tools/install_torch.sh), TORCH_SPEC defaulting to the torch pin in constraints.txt:
#   Linux x86_64  the CPU build: a local wheel if pip's find-links has one, else https://download.pytorch.org/whl/cpu
#                 as an extra index (~200 MB download). PyPI's own Linux x86_64 torch is the CUDA build (several GB).
#   macOS/other   PyPI's default wheel (macOS: CPU + MPS, ~80 MB).
#   CUDA build    only when asked: TORCH_INDEX=https://download.pytorch.org/whl/cu128 make install  (several GB)
#                 (TORCH_INDEX=pypi: PyPI's default;  TORCH_SPEC='torch==X.Y.Z': another release)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
EXTRAS ?= lab,book,test,hf,app,dist
# Empty = tools/install_torch.sh's defaults (the constraints.txt pin; TORCH_INDEX=auto). Exported to the script.
TORCH_SPEC ?=
TORCH_INDEX ?= auto
export TORCH_SPEC TORCH_INDEX

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

.PHONY: help install lab test book notebooks bench reproduce app figures figures-html lock chromium clean distclean

help:
	@sed -n '2,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------------------------------------
# Install: uv (the installer, 20 MB), torch (tools/install_torch.sh: TORCH_SPEC / TORCH_INDEX; a local wheel with
# uv), then the package with the CI pins from constraints.txt minus its torch line (torch is already there; an overridden TORCH_SPEC must not fight the pin).
# The package and its ~190 dependencies go in with uv (the pinned lock tool: parallel downloads and a shared cache;
# measured on the busy course machine, same versions: 6 s against 155 s with pip); where uv cannot (e.g. a machine that
# reaches packages only through pip's own configured mirror, which uv does not read), pip does it.
# Re-runs only when pyproject.toml or constraints.txt change (or the stamp is removed).
$(VENV)/.installed: pyproject.toml constraints.txt tools/install_torch.sh
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
			echo "no venv support (Debian/Ubuntu: python3-venv); installing it: apt-get update && apt-get install -y python3-venv"; \
			export DEBIAN_FRONTEND=noninteractive; apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); \
		else echo "make install: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run as root: apt-get install -y python3-venv" >&2; \
			exit 1; fi; }; }
	grep -v -E '^torch==' constraints.txt > $(VENV)/constraints-no-torch.txt
	$(PY) -m pip install -q -c $(VENV)/constraints-no-torch.txt uv || echo "make install: no uv; pip installs everything"
	TORCH_UV=$(VENV)/bin/uv TORCH_CONSTRAINTS=$(VENV)/constraints-no-torch.txt tools/install_torch.sh $(PY)
	test -x $(VENV)/bin/uv && \
		$(VENV)/bin/uv pip install --python $(PY) -c $(VENV)/constraints-no-torch.txt -e ".[$(EXTRAS)]" || { \
		echo "make install: uv could not install the package (its message is above); installing with pip instead"; \
		$(PY) -m pip install -c $(VENV)/constraints-no-torch.txt -e ".[$(EXTRAS)]"; }
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
# Stops at the first failing step; prints each step's and the whole run's wall time. Order: install check (the
# prerequisite) -> Chromium (tools/ensure_chromium.sh: apt as root, else stop with the command) -> ONE pytest session
# on TEST_WORKERS processes (pytest-xdist, --dist loadscope: a notebook's cells and a test module stay on one worker):
# the offline-book browser test, which first builds the book as `make book` does (the figure pages, then
# jupyter-book build -W -n --keep-going from the committed outputs: execute_notebooks "off", nothing runs twice;
# MOEWIDGETS_BOOK_BUILD=always) and then opens every page; the unit tests, the package's docstrings
# (--doctest-modules, testpaths in pyproject), nbval on the committed outputs, the kernel-free figure pages and the
# classroom page's reconnect (correctness, no target) -> the browser tests that time what a user waits for
# (JupyterLab, six classroom visitors), one at a time with nothing beside them.
# (No $(MAKE) in this recipe: `make -n test` must not run it.)
# The book build is single-threaded: inside the session the other worker runs tests beside it instead of a core
# idling for its ≈ 50 s. The offline-book test (build + ≈ 90 s of pages) is the longest: it goes first, the
# notebooks next, so that no worker is left with it at the end while the other idles.
OFFLINE_BOOK_TEST := tests/browser/test_offline_book.py
TIMED_BROWSER_TESTS := tests/browser/test_chapter1_browser.py tests/browser/test_voila_browser.py
# Workers: the cores, at most 4 (each holds torch and a notebook kernel: ≈ 0.5 GB).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
test: install
	@step() { local name=$$1 t=$$(date +%s); shift; echo; echo "==> $$name: $$*"; \
		"$$@" || return $$?; echo "<== $$name: ok in $$(( $$(date +%s) - t )) s"; }; \
	rc=0; { \
		step "chromium" tools/ensure_chromium.sh && \
		step "pytest: book build + offline book, unit tests, doctests, nbval ($(TEST_WORKERS) workers)" \
			env MOEWIDGETS_BOOK_BUILD=always $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder \
			$(OFFLINE_BOOK_TEST) book tests moewidgets --ignore=book/_build \
			$(addprefix --ignore=,$(TIMED_BROWSER_TESTS)) \
			--nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider && \
		step "browser tests that time what users wait for (one at a time)" \
			$(PY) -m pytest $(TIMED_BROWSER_TESTS) -p no:cacheprovider ; \
	} || rc=$$?; \
	echo; echo "make test: $$( [ $$rc -eq 0 ] && echo PASSED || echo "FAILED (exit $$rc)" )," \
		"wall $$(( $$(date +%s) - $(T0) )) s (including the install check)"; \
	exit $$rc

chromium:
	tools/ensure_chromium.sh

# ---------------------------------------------------------------------------------------------
book: install figures-html
	$(BOOK_BUILD)
	@echo "HTML: book/_build/html/index.html"

# Author edits book/X.md (MyST, jupytext-paired with book/X.ipynb): sync the pairs, then execute every paired notebook
# in place, keeping only the outputs that are committed (tools/execute_notebook.py). Then `make test` checks them.
BOOK_MD_PAIRS = $(shell grep -l -E '^ *formats: *ipynb,md' book/*.md 2>/dev/null)
notebooks: install
	@test -n "$(BOOK_MD_PAIRS)" || { echo "make notebooks: no jupytext-paired book/*.md found" >&2; exit 1; }
	$(VENV)/bin/jupytext --sync $(BOOK_MD_PAIRS)
	$(PY) tools/execute_notebook.py $(BOOK_MD_PAIRS:.md=.ipynb)

bench: install
	$(PY) -m bench.run

reproduce: SEEDS ?= 10
reproduce: install
	$(PY) -m moewidgets reproduce chapter1 --seeds $(SEEDS) --commit-results
	$(PY) -m moewidgets reproduce chapter2 --seeds $(SEEDS) --commit-results
	$(PY) -m moewidgets reproduce chapter3 --seeds $(SEEDS) --commit-results
	$(PY) -m moewidgets reproduce chapter4 --seeds $(SEEDS) --commit-results

# ---------------------------------------------------------------------------------------------
# Classroom mode (app/README.md): the chapter dashboards as web pages, a kernel per page load. The offline
# template drops Voila's CDN stylesheet links; a closed page's kernel is culled after APP_CULL_S idle seconds;
# Voila prints the URL with a fresh token. jupyterlab-myst (installed for the MyST chapters in JupyterLab) is kept out
# of Voila's pages: it needs JupyterLab's markdown viewer, which Voila does not ship ("Shared module
# @jupyterlab/markdownviewer doesn't exist"), and the app pages have no MyST to render; so is jupyterlab-jupytext
# (jupytext 1.19's extension needs JupyterLab's document manager: "The getter for the shared module is not a function
# ... @jupyterlab/docmanager" in every page's console).
# Preheated kernels: Voila keeps APP_POOL kernels per chapter notebook started, with the notebook already run
# (torch imported, the default run trained or taken from the run cache), and hands one to the next visitor; APP_LESSON
# (the chapter a class opens at once) keeps APP_LESSON_POOL. Each waiting kernel holds ≈ 0.4 GB: the default
# (1 per chapter, 4 chapters) ≈ 1.6 GB; `make app APP_LESSON_POOL=6` for six visitors at once adds 2 GB (a lesson on
# one chapter: APP_POOL=0 APP_LESSON_POOL=6, what the Voila test measures). A used kernel
# is replaced 60 s later (after the burst: six replacements at once take both cores for ≈ 15 s; app/README.md).
# APP_POOL=0 APP_LESSON_POOL=0 turns the pools off. Finished runs are shared by all kernels through the run cache
# (MOEWIDGETS_RUN_CACHE, default ~/.cache/moewidgets/runs).
APP_PORT ?= 8866
APP_IP ?= 127.0.0.1
APP_CULL_S ?= 600
APP_POOL ?= 1
APP_LESSON ?= chapter1
APP_LESSON_POOL ?= $(APP_POOL)
APP_POOLS = {"default": {"pool_size": $(APP_POOL)}, "$(APP_LESSON).ipynb": {"pool_size": $(APP_LESSON_POOL)}}
app: install
	JUPYTER_PATH=$(abspath app/.jupyter-path) $(VENV)/bin/voila app --template=offline --no-browser \
		--Voila.ip=$(APP_IP) --port=$(APP_PORT) --Voila.port_retries=0 --token \
		--VoilaConfiguration.extension_denylist='["jupyterlab-myst", "jupyterlab-jupytext"]' \
		--VoilaConfiguration.preheat_kernel=True --VoilaConfiguration.default_pool_size=$(APP_POOL) \
		--VoilaKernelManager.kernel_pools_config='$(APP_POOLS)' \
		--VoilaKernelManager.fill_delay=60 \
		--MappingKernelManager.cull_idle_timeout=$(APP_CULL_S) --MappingKernelManager.cull_interval=60

figures: install
	$(PY) tools/make_static_figures.py

# The built book's figure pages (book/_extra/figures/*.html, not committed: 1.6 MB of inline BokehJS each), rendered
# in seconds from the committed grid data (book/_extra/figures/*.json) and benchmark results (bench/results/*.json).
figures-html: install
	$(PY) tools/make_static_figures.py --render-only
	$(PY) tools/make_performance_figure.py

# ---------------------------------------------------------------------------------------------
# constraints.txt = the lock: every package of every extra, for Python 3.11 (the oldest 3.11, so Debian 12's 3.11.2
# can install it) on Linux x86_64, torch pinned to LOCK_TORCH. The current constraints.txt is the preferred versions
# input, so a re-lock moves nothing it need not (LOCK_UPGRADE=--upgrade to take the newest of everything).
# torch's metadata comes from the CPU build (a local wheel in pip's find-links, else PyTorch's CPU index), so the lock
# holds no nvidia-* packages; its +cpu label is dropped, so `torch==X.Y.Z` matches CPU, CUDA and macOS builds alike.
LOCK_TORCH ?= torch==2.13.0
LOCK_PYTHON ?= 3.11
LOCK_UPGRADE ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install "$$(grep -m 1 -E '^uv==' constraints.txt | cut -d' ' -f1 || echo uv)"
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo '$(LOCK_TORCH)+cpu' > $$tmp/torch.txt; grep -v -E '^torch==' constraints.txt > $$tmp/constraints.txt; \
	links=$${PIP_FIND_LINKS:-$$($(PY) -m pip config get global.find-links 2>/dev/null || true)}; \
	if [ -n "$$links" ] && ls $$links/torch-*.whl >/dev/null 2>&1; then src="--find-links $$links"; \
	else src="--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match"; fi; \
	echo "torch metadata from: $$src"; \
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --python-version $(LOCK_PYTHON) \
		--python-platform x86_64-unknown-linux-gnu -c $$tmp/torch.txt $$src $(LOCK_UPGRADE) \
		--annotation-style line --custom-compile-command "make lock" -o $$tmp/constraints.txt; \
	sed -i -E 's/^(torch==[^+ ;#]+)\+[A-Za-z0-9.]+/\1/; s|-c [^ ,]*/torch\.txt|LOCK_TORCH|' $$tmp/constraints.txt; \
	{ sed -n '1,/^# ---- lock/p' constraints.txt; grep -v -E '^#( |$$)|^#$$' $$tmp/constraints.txt; } > $$tmp/new; \
	norm() { sed -E 's/[[:space:]]*[#;].*//' "$$1" | grep -E '^[A-Za-z0-9]' \
		| awk -F'==' '{n=tolower($$1); gsub(/[-_.]+/,"-",n); print n"=="$$2}' | sort; }; \
	moved=$$(diff <(norm constraints.txt) <(norm $$tmp/new) | grep -E '^[<>]' || true); \
	echo "pins moved (< old, > new):"; echo "$${moved:-  none}"; \
	mv $$tmp/new constraints.txt

# ---------------------------------------------------------------------------------------------
clean:
	rm -rf book/_build build .pytest_cache .cache *.egg-info bench/results/*.tmp
	find . -path './$(VENV)' -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -o -name .ipynb_checkpoints -o -name .pytest_cache \) -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
