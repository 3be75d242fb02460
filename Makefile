# Kennel: every target depends on the virtual environment, so a fresh clone needs only
# `make pipeline-run` or `make test`.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
KENNEL := $(VENV)/bin/kennel
STAMP := $(VENV)/.installed

# Pass-through knobs: make pipeline-run TARGET=aws DATA=path/to/images PARAMS="MaxJobs=4"
TARGET ?=
DATA ?=
PARAMS ?=
IMAGE ?=
VERSION ?=
REASON ?=
TARGET_FLAG := $(if $(TARGET),--target $(TARGET),)

.PHONY: install browser test lint bench sample lock clean \
        pipeline-definition pipeline-upsert pipeline-run pipeline-status approve reject models \
        endpoints predict studio

install: $(STAMP)

# torch/torchvision come from this machine's local wheel disk through pip (uv and poetry would
# download ~3 GB); everything else is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

# The studio's browser tests drive Debian's chromium; Playwright never downloads a browser.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the studio's browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "the studio's browser tests need chromium on PATH: sudo apt-get install chromium"; exit 2; \
	  fi; }

test: $(STAMP) browser
	$(PY) -m pytest

# Speed and overhead figures, each measured against its target and written to bench/results/.
bench: $(STAMP)
	$(PY) bench/pipeline.py
	$(PY) bench/serving.py
	$(PY) bench/debugger_overhead.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Regenerate data/sample from Debian's dataset-fashion-mnist package.
sample: $(STAMP)
	$(PY) data/make_sample.py

# Refresh constraints.txt from the current environment (after changing pyproject.toml).
lock: $(STAMP)
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^kennel'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

pipeline-definition: $(STAMP)
	$(KENNEL) definition $(TARGET_FLAG) -o pipeline-definition.json

pipeline-upsert: $(STAMP)
	$(KENNEL) upsert $(TARGET_FLAG)

# Upsert first, so the run uses the code as it is now (a run executes the upserted definition).
pipeline-run: $(STAMP)
	$(KENNEL) upsert $(TARGET_FLAG)
	$(KENNEL) run $(TARGET_FLAG) --wait $(if $(DATA),--data $(DATA),) $(foreach p,$(PARAMS),--param $(p))

pipeline-status: $(STAMP)
	$(KENNEL) status $(TARGET_FLAG)

models: $(STAMP)
	$(KENNEL) models $(TARGET_FLAG)

# make approve [VERSION=N] [REASON="..."]: the newest package unless VERSION names one.
DECISION_FLAGS = $(if $(VERSION),--version $(VERSION),--latest) $(if $(REASON),--reason "$(REASON)",)
approve: $(STAMP)
	$(KENNEL) approve $(TARGET_FLAG) $(DECISION_FLAGS)

reject: $(STAMP)
	$(KENNEL) reject $(TARGET_FLAG) $(DECISION_FLAGS)

endpoints: $(STAMP)
	$(KENNEL) endpoints $(TARGET_FLAG)

# make predict IMAGE=data/sample/test/bag/t10k-00018.png
predict: $(STAMP)
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=path/to/image.png"; exit 2; }
	$(KENNEL) predict $(TARGET_FLAG) $(IMAGE)

# The local pipeline page on http://127.0.0.1:8470 (PORT=N to change it); Ctrl-C stops it.
PORT ?= 8470
studio: $(STAMP)
	$(KENNEL) studio --port $(PORT)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache pipeline-definition.json
