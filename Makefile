# Set-up and everyday targets. A GPU user overrides the torch build, e.g.
#   make test TORCH_VERSION=2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3.11
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser postgres test demo bench lint dashboard overfit-coco clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	@$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; \
	  sys.exit(0 if v == '$(TORCH_VERSION)' else 'torch %s installed, expected $(TORCH_VERSION)' % v)"
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the dashboard's end-to-end test (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# PostgreSQL's server for the tracking database tests (Debian's package; needs root or sudo). Debian keeps it
# off PATH (/usr/lib/postgresql/<major>/bin, where tests/cluster_nodes.py looks); the tests start their own
# server, so the package's default cluster is not created.
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO mkdir -p /etc/postgresql-common/createcluster.d && \
	  echo 'create_main_cluster = false' | $$SUDO tee /etc/postgresql-common/createcluster.d/kmax.conf >/dev/null && \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

test: $(STAMP) browser postgres
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/kmax demo

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

dashboard: $(STAMP)
	$(VENV)/bin/kmax dashboard

# Overfit the tiny model to the two real COCO sample images (~45 min on 2 CPU cores): both images in one batch
# on one worker with two threads (BatchNorm statistics of both), no flip, both images at a fixed 1.5x scale
# (the references train and evaluate COCO at ~2x: long side 1281), evaluated at that scale on the training
# canvas, the input-resolution mask loss with 3/4 hard points, and crowd regions trained as masks of their
# class (data.augment.crowd_as_ignore=false): the sample's sports ball lies inside a person crowd region,
# and with crowd ignored (the references' training) the unsupervised crowd pixels around it went to the ball
# (IoU 0.45, PQ 84 at the end). Extra settings go in OVERFIT_SET, e.g.
# OVERFIT_SET="--set data.augment.crowd_as_ignore=true" for the references' crowd handling.
COCO_SAMPLE ?= ../shared/fixtures/coco_panoptic_sample
OVERFIT_DIR ?= runs/overfit_coco
OVERFIT_SET ?=
overfit-coco: $(STAMP)
	$(VENV)/bin/kmax prepare --dataset coco --root $(COCO_SAMPLE) --split val --out $(OVERFIT_DIR)/data --quiet
	$(VENV)/bin/kmax train --config tiny --data $(OVERFIT_DIR)/data --run-dir $(OVERFIT_DIR)/run \
	  --set data.train_split=val --set data.val_split=val --set data.batch_size=2 --set data.eval_batch_size=1 \
	  --set scaling.num_workers=1 --set scaling.cpus_per_worker=2 \
	  --set data.augment.crop_size=[641,961] --set data.augment.min_scale=1.5 --set data.augment.max_scale=1.5 \
	  --set data.augment.flip_prob=0.0 --set data.eval_long_side=960 --set data.eval_size=[641,961] \
	  --set train.weight_decay=0.0 --set train.steps=1000 --set train.eval_interval=250 \
	  --set train.checkpoint_interval=250 --set model.loss.mask_loss_at=input \
	  --set model.loss.mask_loss_points=16384 --set model.loss.mask_loss_hard_ratio=0.75 \
	  --set data.augment.crowd_as_ignore=false $(OVERFIT_SET)

clean:
	rm -rf $(VENV) runs .pytest_cache
