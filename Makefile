# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs:
# a venv with the packages, and redis-server through apt-get when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
BASE   := $(VENV)/.installed-base
SGLANG := $(VENV)/.installed-sglang
SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
export DEBIAN_FRONTEND := noninteractive

.PHONY: demo test bench chaos redis-server libibverbs test-tools install install-sglang clean

$(PY):
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(BASE): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[dev]'
	touch $@

# SGLang's real code on a CPU machine (see docs/reference.md): torch's CPU build, the sglang wheel without its
# GPU dependencies, the CPU-side packages its storage interface, host pools and cache controllers import;
# compressed-tensors without its dependencies (they would pull a CUDA torch), and a torchvision stand-in
# (PyPI's torchvision is built for CUDA and fails to import beside torch's CPU build); the clients of
# SGLang's own storage backends (Mooncake, NIXL, AIBrix, an S3 server) for the wrapped members' tests.
$(SGLANG): $(BASE) pyproject.toml tests/stubs/torchvision/pyproject.toml | libibverbs
	$(PIP) install -q 'torch==2.13.0'
	$(PIP) install -q --no-deps 'sglang==0.5.23'
	$(PIP) install -q -e '.[dev,test-sglang-cpu,test-backends]'
	$(PIP) install -q --no-deps 'compressed-tensors==0.18.0' ./tests/stubs/torchvision
	$(PIP) install -q --no-deps 'nixl==1.5.1' 'nixl-cu12==1.5.1' 'aibrix-kvcache==0.8.0'
	$(PY) -W ignore -c "import sglang.srt.managers.cache_controller, sglang.srt.mem_cache.pool_host.mha, sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller, sglang.srt.mem_cache.unified_radix_cache, mooncake.store, nixl, aibrix_kvcache.cache_manager, moto.server"
	touch $@

# Mooncake's client library links libibverbs even over TCP (Debian's libibverbs1).
libibverbs:
	@ldconfig -p | grep -q 'libibverbs\.so\.1 ' || { echo "installing with apt-get: libibverbs1"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends libibverbs1; }

install: $(BASE)
install-sglang: $(SGLANG)

# Debian packages, installed only when their command is missing: name of command=package.
define need_debs
	@missing=""; for pair in $(1); do cmd=$${pair%%=*}; pkg=$${pair#*=}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing with apt-get:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi
endef

redis-server:
	$(call need_debs,redis-server=redis-server)

# What the tests use besides redis: promtool (alert rule tests), headless Chromium (status page), kubectl
# (renders deploy/kubernetes with its built-in kustomize), openssl (TLS certificates), and for the chaos
# suite stress-ng (busy CPUs), iproute2 and iptables (a blackholed host in a network namespace); etcd, where
# Mooncake masters in HA mode elect their leader.
test-tools:
	$(call need_debs,redis-server=redis-server promtool=prometheus chromium=chromium kubectl=kubernetes-client stress-ng=stress-ng ip=iproute2 iptables=iptables openssl=openssl etcd=etcd-server)

demo: $(BASE) redis-server
	$(VENV)/bin/hicache-ha demo

test: $(SGLANG) test-tools
	$(PY) -m pytest -q

bench: $(SGLANG) test-tools
	$(PY) bench/overhead.py
	$(PY) bench/failover.py
	$(PY) bench/switch.py
	$(PY) bench/wrapped.py --stress

# The chaos suite's long profile (make test runs the short one): every fault, 3 trials, CPUs loaded.
chaos: $(SGLANG) test-tools
	$(PY) bench/chaos.py --profile long --trials 3

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
