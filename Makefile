# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.maskconv-installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: these releases install from local disk here (pip is capped at them).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,viz,export,detect,shards]'
	touch $(STAMP)

demo: $(STAMP)
	@# Fashion-MNIST from Debian when we can install it; otherwise the demo falls back to bundled photos.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "(could not install dataset-fashion-mnist: the demo will use the photos bundled with scikit-image)"; fi
	$(BIN)/python -m maskconv demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

bench: $(STAMP)
	$(BIN)/python bench/convnext_vs_timm.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) demo_out bench_out
