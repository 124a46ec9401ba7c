# The two commands of the README: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv sysdeps test lint demo bench faults sbom audit-deps clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests start for real: mosquitto (broker), dbus-daemon (fake BlueZ bus),
# systemd-analyze (unit checks). Installed with apt-get when missing and running as root.
# libfaketime: the fault suite's clock-jump test (skipped, with the reason, without it).
LIBFAKETIME := $(or $(wildcard /usr/lib/*/faketime/libfaketime.so.1),/usr/lib/faketime/libfaketime.so.1)
SYSPKGS := mosquitto:/usr/sbin/mosquitto dbus-daemon:/usr/bin/dbus-daemon \
           systemd:/usr/bin/systemd-analyze libfaketime:$(LIBFAKETIME) iproute2:/usr/bin/ss
sysdeps:
	@missing=""; for pair in $(SYSPKGS); do pkg=$${pair%%:*}; path=$${pair#*:}; \
	  [ -e "$$path" ] || missing="$$missing $$([ $$pkg = dbus-daemon ] && echo dbus || echo $$pkg)"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing system packages:$$missing (run as root or: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv sysdeps lint
	$(BIN)/pytest -q

# The whole fault suite, slow runs included (50 kills, the 30-minute soak: FAULTS_SOAK_S,
# FAULTS_KILLS to change them), with the summary table.
faults: venv sysdeps
	$(BIN)/pytest -q -o addopts=-ra tests/faults tests/test_faultproxy.py

demo: venv
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || echo "(mosquitto not installed: the demo runs over CoAP)"
	$(BIN)/branch-agent demo

bench: venv sysdeps
	$(BIN)/python bench/run_all.py

# Supply chain: a CycloneDX SBOM of the installed environment, and a vulnerability audit of the
# dependencies. The tools live in their own venv so that .venv holds only what the agent needs.
# pip-audit needs an advisory source (PyPI's JSON API or OSV); where none is reachable it says
# so (docs/SECURITY.md).
SBOMVENV := .venv-sbom
$(SBOMVENV)/.ok:
	$(PYTHON) -m venv $(SBOMVENV) && $(SBOMVENV)/bin/pip install --quiet cyclonedx-bom pip-audit && touch $@

sbom: venv $(SBOMVENV)/.ok
	$(SBOMVENV)/bin/cyclonedx-py environment --of JSON -o sbom.cdx.json $(BIN)/python
	@echo "wrote sbom.cdx.json"

audit-deps: venv $(SBOMVENV)/.ok
	$(SBOMVENV)/bin/pip-audit --path $$($(BIN)/python -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])') --progress-spinner off

clean:
	rm -rf $(VENV) $(SBOMVENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache sbom.cdx.json
