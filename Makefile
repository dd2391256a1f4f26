# The two front doors: `make demo` and `make test`. Both create .venv and install what they
# need, including Debian packages when run as root (see deploy/apt-install.sh). `make
# test-quick` is the tier that needs no external program.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_TOOLS_STAMP := $(VENV)/.test-tools

.PHONY: demo test test-quick soak lint venv build-prerequisites test-tools viewer-deps viewer clean

# The demo installs Orthanc when it can (as root); without it, it runs in file-drop mode. As
# root it runs in a private network namespace, like the tests (Orthanc binds every interface).
# It writes into DEMO_OUT, where `make viewer` looks (its state: DEMO_OUT/state/mrrp.sqlite3).
DEMO_OUT ?= demo-output
demo: venv
	@test -x /usr/sbin/Orthanc || deploy/apt-install.sh orthanc \
		|| echo "Orthanc could not be installed: the demo runs in file-drop mode"
	@if [ "$$(id -u)" = 0 ] && command -v ip >/dev/null && unshare --net true 2>/dev/null; then \
		unshare --net sh -c 'ip link set lo up && exec $(BIN)/mrrp-pacs demo --out $(DEMO_OUT) $(DEMO_ARGS)'; \
	else \
		$(BIN)/mrrp-pacs demo --out $(DEMO_OUT) $(DEMO_ARGS); \
	fi

# The OHIF viewer on the demo's results (after `make demo`, same DEMO_OUT); ORTHANC_URL=... to
# show another DICOMweb-enabled Orthanc instead.
viewer: venv viewer-deps
	@test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
		|| deploy/apt-install.sh orthanc orthanc-dicomweb
	$(BIN)/mrrp-pacs viewer $(if $(ORTHANC_URL),--orthanc $(ORTHANC_URL),--demo $(DEMO_OUT))

# The pinned prebuilt OHIF viewer and playwright-core (drives Debian's chromium in the viewer
# test; no browser is downloaded). Needs Node.js >= 20 and npm.
VIEWER_STAMP := deploy/viewer/node_modules/.package-lock.json
viewer-deps: $(VIEWER_STAMP)
$(VIEWER_STAMP): deploy/viewer/package.json deploy/viewer/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm (Node.js >= 20) is needed for the viewer" >&2; exit 1; }
	npm ci --prefix deploy/viewer --no-audit --no-fund --ignore-scripts --loglevel=error

# As root, the tests run in a private network namespace: only a loopback interface exists,
# so the servers they start (Orthanc listens on all interfaces) reach nothing else.
# Then the tests of everything that stamps, waits, retries or schedules run a second time with
# the wall clock moved FUTURE ahead (time-machine, in the test process and every Python process
# it starts; tests/support/clock_travel.py): a test that compares a date literal with the wall
# clock fails the day it is written, not on the day the calendar overtakes it. Feature
# extraction, the model, the phantom, the viewer and the demo read no clock and are left out of
# that pass to keep CI short; so is the fault harness (tests/reliability), whose daemons decide by
# the same code the time-sensitive tests already run ahead, every test marked clock_free
# (its decisions read an injected clock only) and every fuzz test (inputs, not dates). That pass runs in two pytest-xdist workers, a
# test file at a time each (--dist loadfile: a module's fixtures are built once): most of it
# waits on sockets, daemons and back-offs rather than computing (on a busy 2-core machine its
# 368 tests other than the daemon end-to-end test took 289 s in one process, 152 s in two).
# Both passes print their 15 slowest tests.
FUTURE ?= +365d
PYTEST_NOW := $(BIN)/pytest --durations=15
PYTEST_FUTURE := MRRP_TEST_CLOCK_AHEAD=$(FUTURE) $(BIN)/pytest -p no:cacheprovider \
	-n 2 --dist loadfile --durations=15 -m "not clock_free and not fuzz" \
	--ignore=tests/mrrp_pacs/features --ignore=tests/mrrp_pacs/model \
	--ignore=tests/mrrp_pacs/phantom --ignore=tests/viewer --ignore=tests/test_demo_e2e.py \
	--ignore=tests/reliability
test: venv test-tools viewer-deps lint
	@if [ "$$(id -u)" = 0 ] && unshare --net true 2>/dev/null; then \
		echo "pytest in a private network namespace (loopback only)"; \
		unshare --net sh -c 'ip link set lo up && $(PYTEST_NOW) \
			&& echo "again with the clock $(FUTURE) ahead" && $(PYTEST_FUTURE)'; \
	else \
		$(PYTEST_NOW) && echo "again with the clock $(FUTURE) ahead" \
			&& $(PYTEST_FUTURE); \
	fi

# The fault harness at full size (tests/reliability): every named kill point in four seeded
# chains on a six-patient phantom, SIGKILL each time; prints one table of totals. Then every
# fuzz test (marker fuzz) with >= 100,000 inputs per surface. `make test` runs one short
# chain of the harness and a bounded number of inputs of each fuzz test.
soak: venv test-tools
	MRRP_SOAK=1 $(BIN)/pytest tests/reliability -s -p no:cacheprovider
	MRRP_SOAK=1 $(BIN)/pytest -m fuzz -p no:cacheprovider --durations=0

# The quick tier: lint, then every test not marked e2e, i.e. that runs no external program
# (Orthanc, dcmtk, dicom3tools, R, poppler, Chromium, Node.js: tests/support/tools.py). It
# installs none of them, starts no Orthanc and needs no network namespace; `make test` runs
# every tier. `.ci/without-test-tools make test-quick` proves it on a machine that has them.
test-quick: venv lint
	$(BIN)/pytest -m "not e2e"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

venv: $(STAMP)

# Prerequisites for creating the venv and building pyradiomics' C extension.
build-prerequisites:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || deploy/apt-install.sh python3-venv
	@$(PYTHON) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
		|| deploy/apt-install.sh python3-dev
	@command -v gcc >/dev/null || deploy/apt-install.sh gcc libc6-dev

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory build-prerequisites
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real external programs the tests use: Orthanc (PACS) with its DICOMweb plugin and its WSI
# Dicomizer (slides as another producer writes them), dcmtk,
# dicom3tools, R survival, poppler (pdftoppm renders the PDF companion), chromium (the viewer
# test), openssl (the TLS tests' certificates) and iproute2 for the private network namespace.
# A test that runs one says so (needs_tool, tests/support/tools.py) and fails if it is missing.
test-tools:
	@if command -v storescu >/dev/null && command -v dsrdump >/dev/null \
		&& command -v dciodvfy >/dev/null && test -x /usr/sbin/Orthanc \
		&& command -v OrthancWSIDicomizer >/dev/null && command -v ip >/dev/null \
		&& command -v pdftoppm >/dev/null && command -v chromium >/dev/null \
		&& command -v openssl >/dev/null \
		&& test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
		&& Rscript -e 'suppressMessages({library(survival); library(riskRegression); library(pec)})' \
			>/dev/null 2>&1; then :; \
	else deploy/apt-install.sh orthanc orthanc-dicomweb orthanc-wsi dcmtk dicom3tools \
		r-cran-survival r-cran-riskregression r-cran-pec poppler-utils chromium iproute2 openssl; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
