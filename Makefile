# Everything a fresh clone needs: `make demo` and `make test` each run `setup` first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
STAMPS := $(CURDIR)/.stamps
# The venv's bin first on PATH in every target: pip's ninja and Debian's ninja hash DeepSpeed's
# op build differently, so a PATH flip forces a 30 s rebuild (../shared/docs/stack-notes.md).
export PATH := $(VENV)/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test demo sweep-demo bench lock sample-data clean cluster cluster-stop

setup: $(STAMPS)/deps $(STAMPS)/ds-ops sample-data

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the lock file changes.
$(STAMPS)/deps: requirements.lock pyproject.toml | $(VENV)/bin/python
	@mkdir -p $(STAMPS)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.lock
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $@

# DeepSpeed JIT-compiles its CPU shared-memory comm op at the first distributed init (25-38 s);
# build it once here so no test or job pays for it.
$(STAMPS)/ds-ops: $(STAMPS)/deps
	$(VENV)/bin/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	@touch $@

# The built-in sample corpus (Debian package, MIT): 70k 28x28 labelled images.
sample-data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (sample corpus)"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ; \
	else \
	  echo "The sample corpus is missing. Install it with:  sudo apt-get install dataset-fashion-mnist"; \
	  exit 1; \
	fi

test: setup
	$(VENV)/bin/python -m pytest tests -q --durations=25

demo: setup
	$(VENV)/bin/python -m launch.demo

# A CPU scaling sweep (configs/sweeps/demo.yaml, ~26 min on 2 cores): runs/sweep-demo/report/report.md
sweep-demo: setup
	$(VENV)/bin/python -m launch.demo --sweep

# A local Ray head with the demo's settings: token authentication (Ray >= 2.59 turns it on for local
# clusters), dashboard and job server on 127.0.0.1:8265. Submit to it with
#   export RAY_AUTH_MODE=token; python launch/submit.py -- python launch/pretrain_f7.py --preset demo
cluster: setup
	@RAY_AUTH_MODE=token ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 ray start --head --port 6379 --dashboard-host 127.0.0.1 \
	  --dashboard-port 8265 --disable-usage-stats
	@echo "submit with:  export RAY_AUTH_MODE=token; $(VENV)/bin/python launch/submit.py -- python launch/pretrain_f7.py --preset demo"

cluster-stop:
	$(VENV)/bin/ray stop

bench: setup
	$(VENV)/bin/python bench/model_step.py
	$(VENV)/bin/python bench/pack.py
	$(VENV)/bin/python bench/loader.py
	RAY_AUTH_MODE=token $(VENV)/bin/python bench/train_step.py --model nfnet_micro --res 96

# Re-resolve the pins from the direct dependencies (maintainers only).
lock:
	rm -rf $(CURDIR)/.lockvenv && $(PYTHON) -m venv $(CURDIR)/.lockvenv
	$(CURDIR)/.lockvenv/bin/pip install -q -e '.[test]' ninja
	{ echo "# Exact pins for every dependency (pip freeze of a clean install; Python 3.11, x86_64 Linux)."; \
	  echo "# Regenerate: make lock. torch 2.14.1 is a CUDA build that also runs on CPU."; \
	  $(CURDIR)/.lockvenv/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf $(CURDIR)/.lockvenv

clean:
	rm -rf $(VENV) $(STAMPS)
