# The two commands of the README: `make demo` and `make test`. Each sets up .venv by itself.
#
# What is installed is what is locked. requirements.lock pins every runtime package of the
# product, transitive ones included, with hashes (CPython 3.11, Linux x86_64 and aarch64);
# hardware-sim/requirements.lock adds the simulator's; tests/requirements.lock adds the test
# tools, compiled with those as a constraint so that no test tool can move a runtime package; tests/compat/requirements.lock is a second environment for the
# protocol tests under cbor2 5.x and the independent COSE verifier cwt (which needs cbor2 < 6).
# `make lock` refreshes all three. Every install below is `pip install --require-hashes`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK        := requirements.lock
SIM_LOCK    := hardware-sim/requirements.lock
TEST_LOCK   := tests/requirements.lock
COMPAT_LOCK := tests/compat/requirements.lock
PIP_LOCKED  := python -m pip install --quiet --no-input --require-hashes
# The product itself goes in on top of a locked environment, never resolving anything.
PIP_SELF    := python -m pip install --quiet --no-input --no-deps --no-build-isolation

.PHONY: all venv sysdeps test test-compat test-dist dist-venvs dist wheelhouse lock lint demo bench bench-smoke faults mutants sbom \
        audit-deps clean release releasedeps field-test

all: test

$(STAMP): pyproject.toml hardware-sim/pyproject.toml $(LOCK) $(SIM_LOCK) $(TEST_LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_LOCKED) -r $(SIM_LOCK) -r $(TEST_LOCK)
	$(BIN)/$(PIP_SELF) -e . -e hardware-sim
	touch $(STAMP)

venv: $(STAMP)

# The locks. uv resolves for CPython 3.11 on manylinux 2.36 (Debian bookworm and Raspberry Pi
# OS have glibc 2.36), wheels only except for pyric (pure Python, published as an sdist only).
# requirements.lock is the product alone: what a gateway installs. hardware-sim/requirements.lock
# adds the simulator's own (rich, for the demo) with the product's lock as a constraint. The
# x86_64 and aarch64 resolutions must agree, so one file serves both (every file's hash is in
# it). armv7l is checked and reported: see README ("Supported platforms").
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --generate-hashes \
             --only-binary :all: --no-binary pyric --custom-compile-command "make lock" \
             --no-emit-package branch-gateway-agent --no-emit-package branch-gateway-sim
X86 := --python-platform x86_64-manylinux_2_36
ARM := --python-platform aarch64-manylinux_2_36
SAME_PINS = diff <(grep -E '^[a-z0-9]' $(1)) <(grep -E '^[a-z0-9]' $(2)) >/dev/null || \
            { echo "$(1): x86_64 and aarch64 resolve differently"; exit 1; }
lock: venv
	printf -- '-e .\n' | $(UV_COMPILE) $(X86) --upgrade - -o $(LOCK)
	printf -- '-e .\n' | $(UV_COMPILE) $(ARM) - -o $(LOCK).aarch64
	$(call SAME_PINS,$(LOCK),$(LOCK).aarch64)
	printf -- '-e .\n-e hardware-sim\n' | $(UV_COMPILE) $(X86) --upgrade -c $(LOCK) - -o $(SIM_LOCK)
	printf -- '-e .\n-e hardware-sim\n' | $(UV_COMPILE) $(ARM) -c $(LOCK) - -o $(SIM_LOCK).aarch64
	$(call SAME_PINS,$(SIM_LOCK),$(SIM_LOCK).aarch64)
	rm -f $(LOCK).aarch64 $(SIM_LOCK).aarch64
	$(UV_COMPILE) $(X86) --upgrade -c $(SIM_LOCK) tests/requirements.in -o $(TEST_LOCK)
	sed -n 's/^\([a-z0-9._-]*==[^ ]*\).*/\1/p' $(SIM_LOCK) | grep -v '^cbor2==' > $(COMPAT_LOCK).constraints
	printf -- '-e .\n-e hardware-sim\n-r tests/requirements.in\n-r tests/compat/requirements.in\n' | \
	  $(UV_COMPILE) $(X86) --upgrade -c $(COMPAT_LOCK).constraints - -o $(COMPAT_LOCK)
	rm -f $(COMPAT_LOCK).constraints
	$(BIN)/python -m tests.support.lock armv7l $(LOCK)

# System packages the tests start for real: mosquitto (broker), dbus-daemon (fake BlueZ bus),
# systemd-analyze (unit checks). Installed with apt-get when missing and running as root.
# libfaketime: the fault suite's clock-jump test (skipped, with the reason, without it).
# strace: tests/test_atomic.py replays a writer's real system calls against a power-cut model.
# fuse3 (fusermount3 and libfuse3, which mfusepy loads): the power-cut file system,
# branchsim.powerfs (tests/test_powerfs.py, tests/faults/test_powercut.py).
# nats-server and postgresql: the platform at fleet scale (tests/test_fleet.py, bench/fleet.py):
# a 3-node NATS JetStream cluster with its MQTT listener, and PostgreSQL as the store.
# nut-server (upsd and the dummy-ups driver) and snmpd: the facility sources over IP
# (tests/test_nut.py, tests/test_snmp.py) run against them.
LIBFAKETIME := $(or $(wildcard /usr/lib/*/faketime/libfaketime.so.1),/usr/lib/faketime/libfaketime.so.1)
INITDB := $(or $(wildcard /usr/lib/postgresql/*/bin/initdb),/usr/lib/postgresql/15/bin/initdb)
SYSPKGS := mosquitto:/usr/sbin/mosquitto dbus-daemon:/usr/bin/dbus-daemon \
           systemd:/usr/bin/systemd-analyze libfaketime:$(LIBFAKETIME) iproute2:/usr/bin/ss \
           strace:/usr/bin/strace fuse3:/usr/bin/fusermount3 \
           nats-server:/usr/bin/nats-server postgresql:$(INITDB) \
           nut-server:/usr/sbin/upsd snmpd:/usr/sbin/snmpd
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

# The whole suite from the source tree, then the protocol tests under cbor2 5.x with cwt, then
# the end-to-end checks against the built wheel installed from the lock.
test: venv sysdeps releasedeps lint
	$(BIN)/pytest -q --ignore=tests/dist --ignore=tests/compat
	$(MAKE) --no-print-directory test-compat
	$(MAKE) --no-print-directory test-dist

COMPAT := .venv-compat
$(COMPAT)/.installed: pyproject.toml hardware-sim/pyproject.toml $(COMPAT_LOCK)
	rm -rf $(COMPAT)
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/$(PIP_LOCKED) -r $(COMPAT_LOCK)
	$(COMPAT)/bin/$(PIP_SELF) -e . -e hardware-sim
	touch $@

PROTOCOL_TESTS := tests/test_cbor.py tests/test_protocol.py tests/test_vectors.py tests/compat \
                  tests/test_commands.py::test_vectors_replayed_in_order \
                  $(addprefix tests/test_coap_ingest.py::test_senml_,json_golden cbor_golden \
                    malformed_is_an_error_not_an_exception bad_cbor_and_record_limit)
test-compat: $(COMPAT)/.installed
	@echo "== protocol tests under cbor2 $$($(COMPAT)/bin/python -m tests.support.lock version cbor2)" \
	  "with cwt $$($(COMPAT)/bin/python -m tests.support.lock version cwt)" \
	  "(.venv: cbor2 $$($(BIN)/python -m tests.support.lock version cbor2))"
	$(COMPAT)/bin/pytest -q -p no:cacheprovider $(PROTOCOL_TESTS)

# The release artefacts of both distributions: each sdist, and each wheel built from its sdist
# (so the sdists are complete).
DIST := dist
dist: venv
	rm -rf $(DIST)
	$(BIN)/python -m build --no-isolation --outdir $(DIST) . >/dev/null
	$(BIN)/python -m build --no-isolation --outdir $(DIST) hardware-sim >/dev/null
	@ls -l $(DIST)

# Everything a gateway installs, for one architecture (ARCH=aarch64 for a Raspberry Pi; the
# build host's by default): every locked file for CPython 3.11 on manylinux <= 2.36, checked
# against the locks' hashes, and the built wheels (the simulator's too, for developers and the
# platform team; a gateway installs only requirements.lock and the product's wheel). The runbook installs it with
# --no-index. pip.lock is the lock's own pip, installed first: Debian's pip 23 cannot build
# pyric (the one sdist) offline, it wants the `wheel` package, which the locked pip no longer
# needs.
ARCH ?= $(shell uname -m)
WHEELHOUSE = $(DIST)/wheelhouse-$(ARCH)
MANYLINUX  = manylinux2014_$(ARCH) $(foreach v,17 24 26 27 28 31 32 33 34 35 36,manylinux_2_$(v)_$(ARCH))
wheelhouse: dist
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip download --quiet --no-input --no-deps --require-hashes \
	  --only-binary=:all: --no-binary=pyric $(addprefix --platform ,$(MANYLINUX)) \
	  --python-version 3.11 --implementation cp -r $(SIM_LOCK) -d $(WHEELHOUSE)
	cp $(LOCK) $(DIST)/*.whl $(WHEELHOUSE)/
	cp $(SIM_LOCK) $(WHEELHOUSE)/requirements-sim.lock
	$(BIN)/python -m tests.support.lock pin pip $(LOCK) > $(WHEELHOUSE)/pip.lock
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE) | wc -l) files"

# Two clean venvs installed as the runbook says, offline from the wheelhouse: exactly the
# locked runtime packages (--require-hashes), then the product's wheel (--no-deps); the second
# also gets the simulator's wheel on top. tests/dist runs against them, from a directory
# outside the checkout.
DISTVENV := .venv-dist
SIMVENV  := .venv-dist-sim
WH_INSTALL = python -m pip install --quiet --no-input --no-index
test-dist: dist-venvs
	@echo "== end-to-end against the built wheels ($$(cd $(DIST) && ls *.whl | tr '\n' ' '))" \
	  "installed offline from $(WHEELHOUSE): the product alone from $(LOCK) in $(DISTVENV)," \
	  "with the simulator from $(SIM_LOCK) in $(SIMVENV)"
	BRANCH_DIST_VENV=$(abspath $(DISTVENV)) BRANCH_DIST_SIM_VENV=$(abspath $(SIMVENV)) \
	  BRANCH_DIST_DIR=$(abspath $(DIST)) $(BIN)/pytest -v -p no:cacheprovider tests/dist

dist-venvs: wheelhouse sysdeps
	rm -rf $(DISTVENV) $(SIMVENV)
	for v in $(DISTVENV) $(SIMVENV); do $(PYTHON) -m venv $$v && \
	  $$v/bin/$(WH_INSTALL) --require-hashes --find-links $(WHEELHOUSE) -r $(WHEELHOUSE)/pip.lock \
	  || exit 1; done
	$(DISTVENV)/bin/$(WH_INSTALL) --require-hashes --find-links $(WHEELHOUSE) -r $(WHEELHOUSE)/$(LOCK)
	$(DISTVENV)/bin/$(WH_INSTALL) --no-deps $(WHEELHOUSE)/branch_gateway_agent-*.whl
	$(SIMVENV)/bin/$(WH_INSTALL) --require-hashes --find-links $(WHEELHOUSE) \
	  -r $(WHEELHOUSE)/requirements-sim.lock
	$(SIMVENV)/bin/$(WH_INSTALL) --no-deps $(WHEELHOUSE)/branch_gateway_agent-*.whl \
	  $(WHEELHOUSE)/branch_gateway_sim-*.whl

# The Debian packages (branch-agent, branch-gateway-sim) for arm64 and amd64, built from the
# locks on this machine whatever its architecture, checked by lintian, and a signed apt
# repository of them in dist/release/repo (tests/support/release.py). RELEASE_KEY=FINGERPRINT
# signs with that key of $GNUPGHOME; without it a key is made for the run (a test build).
RELEASE_TOOLS := debhelper:/usr/bin/dh lintian:/usr/bin/lintian reprepro:/usr/bin/reprepro \
                 gnupg:/usr/bin/gpg dpkg-dev:/usr/bin/dpkg-buildpackage
releasedeps:
	@$(MAKE) --no-print-directory sysdeps SYSPKGS="$(RELEASE_TOOLS)"
release: venv releasedeps
	$(BIN)/python -m tests.support.release $(if $(RELEASE_KEY),--key $(RELEASE_KEY)) \
	  $(if $(RELEASE_VERSION),--version $(RELEASE_VERSION))

# The packages where gateways run them (not in CI: it downloads an arm64 Debian root and runs
# it under qemu-user-static; as root): install from the signed repository, provision, run,
# upgrade with events buffered, remove, purge (tests/support/fieldtest.py). FIELD_WORK=DIR keeps
# its work (the root is reused by the next run).
FIELD_TOOLS := mmdebstrap:/usr/bin/mmdebstrap qemu-user-static:/usr/bin/qemu-aarch64-static \
               arch-test:/usr/bin/arch-test mosquitto:/usr/sbin/mosquitto
field-test: venv releasedeps
	@$(MAKE) --no-print-directory sysdeps SYSPKGS="$(FIELD_TOOLS)"
	$(BIN)/python -m tests.support.fieldtest $(if $(FIELD_WORK),--work $(FIELD_WORK))

# The whole fault suite, slow runs included (50 kills, 50 power cuts on branchsim.powerfs, the
# 30-minute soak: FAULTS_SOAK_S, FAULTS_KILLS, FAULTS_CUTS to change them), with the summary table.
faults: venv sysdeps
	$(BIN)/pytest -q -o addopts=-ra tests/faults tests/test_faultproxy.py

# Each promise's test fails when the promise breaks: every mutation of tests/support/mutants.py
# applied to a copy of the tree, its tests run against it, each must fail (`--list` names them).
mutants: venv sysdeps
	$(BIN)/python -m tests.support.mutants

demo: venv
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || echo "(mosquitto not installed: the demo runs over CoAP)"
	$(BIN)/branch-sim demo

# footprint.py's agent runs on .venv-dist: the packages a gateway installs, and no others.
bench: venv sysdeps dist-venvs
	$(BIN)/python bench/run_all.py

# The benchmarks still run (--quick sizes, no figure judged), the fleet benchmark's 2.5 minutes
# included (make test leaves that one out).
bench-smoke: venv sysdeps
	$(BIN)/pytest -q -o addopts=-ra tests/test_bench_smoke.py

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
	rm -rf $(VENV) $(COMPAT) $(DISTVENV) $(SIMVENV) $(DIST) $(SBOMVENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache sbom.cdx.json
