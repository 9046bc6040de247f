# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both create (or reuse) the virtual environment in .venv/ first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flywheel-installed

.PHONY: run test bench bench-deps bench-mlserver bench-kserve bench-alibi clean-venv system-deps edge-runner lock wheel client-wheel

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Flywheel needs Python 3.11+")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3 setuptools==84.2.1 wheel==0.48.0
	@# the distribution was called "flywheel" before it became flywheel-ml
	$(PY) -m pip uninstall --quiet --yes flywheel 2>/dev/null || true
	$(PY) -m pip install --quiet -c requirements.lock -e '.[train,test,bench,edge,s3,batch,convert,tracing]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/flywheel run

# The registry's store suite also runs against a real PostgreSQL server, which
# the tests start themselves from Debian's `postgresql` package binaries; the
# image test builds deploy/Dockerfile with podman on a base made by
# debootstrap; the console's pages are tested in headless Chromium (with its
# chromedriver). As root with apt-get, install what is missing; otherwise
# those tests skip and say why.
SYSTEM_TOOLS := postgresql:/usr/lib/postgresql/*/bin/initdb podman:/usr/bin/podman debootstrap:/usr/sbin/debootstrap runc:/usr/sbin/runc prometheus:/usr/bin/promtool chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do \
	  ls $${t#*:} >/dev/null 2>&1 || missing="$$missing $${t%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's$$missing for the tests ..."; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	      || echo "note: could not install$$missing; the tests that need them will skip"; \
	  else \
	    echo "note: missing$$missing; the tests that need them will skip"; \
	  fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest

# The multi-node tests alone (also part of `make test`): a Ray head and a
# worker node, each in a network namespace of its own (needs root).
.PHONY: cluster-test
cluster-test: $(STAMP)
	$(PY) -m pytest -m cluster

# The latency benchmark loads servers with nghttp2's h2load (a C client) when
# it is installed; as root with apt-get, install it.
bench-deps:
	@if ! command -v h2load >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's nghttp2-client (h2load) for the latency benchmark ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; \
	  else \
	    echo "note: no h2load; the latency benchmark falls back to its Python client"; \
	  fi; \
	fi

# MLServer, the latency benchmark's second reference, in its own environment
# (its pins do not fit ours; uvloop 0.21: MLServer 1.7's workers fail on 0.23).
bench-mlserver:
	test -x .venv-mlserver/bin/python || $(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet mlserver==1.7.1 onnxruntime==1.32.0 uvloop==0.21.0

# KServe's Python ModelServer, the latency benchmark's third reference, in its
# own environment (its pins do not fit ours either)
bench-kserve:
	test -x .venv-kserve/bin/python || $(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/pip install --quiet kserve==0.21.0 onnxruntime==1.32.0

# alibi-detect, the drift benchmark's peer, in its own environment (0.13 pins
# numpy < 2 and numba < 0.60; its MMD runs on its PyTorch backend).
bench-alibi:
	test -x .venv-alibi/bin/python || $(PYTHON) -m venv .venv-alibi
	.venv-alibi/bin/pip install --quiet 'alibi-detect[torch]==0.13.0' numpy==1.26.4 torch==2.13.0

# The native edge runner (CMakeLists.txt), against the ExecuTorch wheel in .venv.
edge-runner: $(STAMP)
	cmake -S . -B build/edge -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import executorch; print(list(executorch.__path__)[0] + "/lib/cmake")')"
	cmake --build build/edge -j2
	@echo "built build/edge/flywheel-edge-run"

bench: $(STAMP) bench-deps edge-runner
	$(PY) -m flywheel.bench.latency
	$(PY) -m flywheel.bench.serving
	$(PY) -m flywheel.bench.wire
	$(PY) -m flywheel.bench.drift
	$(PY) -m flywheel.bench.quantization --runner build/edge/flywheel-edge-run
	$(PY) -m flywheel.bench.auth
	$(PY) -m flywheel.bench.routing
	$(PY) -m flywheel.bench.training
	$(PY) -m flywheel.bench.startup
	$(PY) -m flywheel.bench.batch
	$(PY) -m flywheel.bench.http_limits
	$(PY) -m flywheel.bench.capture
	$(PY) -m flywheel.bench.pipeline

# The soak with faults (issue 25): open-loop mixed load for 10 minutes on a
# local Ray while replicas, the router controller, the drift monitor and a gRPC
# front are killed; exits 1 on a failure no fault explains. Not part of `make
# test` or `make bench`. Options: `make soak SOAK_ARGS="--minutes 2 --rate 80"`.
.PHONY: soak
soak: $(STAMP)
	$(PY) -m flywheel.bench.soak $(SOAK_ARGS)

# The cluster benchmark (issue 22): one node vs two at c=32, failover after a
# node kill, autoscaling reaction time, on a Ray head and a worker node in
# network namespaces (needs root, like cluster-test). Not part of `make bench`.
# About 5 minutes. Options: `make bench-cluster CLUSTER_ARGS="--rounds 2"`.
.PHONY: bench-cluster
bench-cluster: $(STAMP) bench-deps
	$(PY) -m flywheel.bench.cluster $(CLUSTER_ARGS)

# The flywheel turning on the demo (issue 18): serve digits with drift, capture
# and a loop, shift the live inputs, and watch drift -> retraining -> gates ->
# canary -> promotion; prints the timeline and the figures, plots to
# bench/results/loop.png. About two minutes here. Not part of `make test`.
.PHONY: loop-demo
loop-demo: $(STAMP)
	$(PY) -m flywheel.bench.loop

# requirements.lock from a resolve against the public index alone (deploy/lock.py);
# `make test` checks that the lock as committed still resolves there.
lock: $(STAMP)
	$(PY) deploy/lock.py

# The wheel that `pip install flywheel-ml` gets, and the images build from
# (pure Python: no .venv needed, only pip; build/lib is cleared so that a
# module deleted from the tree cannot ship from an earlier build).
wheel:
	rm -rf build/lib build/bdist.*
	$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) -m pip wheel --quiet --no-deps -w dist .
	@ls dist/flywheel_ml-*.whl

# flywheel-client: the Python client and the protocol only (NumPy, msgspec;
# grpcio and protobuf with its grpc extra), for applications that only call a
# server (deploy/client_wheel.py).
client-wheel:
	$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) deploy/client_wheel.py --out dist

clean-venv:
	rm -rf $(VENV)
