# cgh: one command per job. `make install` is idempotent and fast once done.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CGH    := $(VENV)/bin/cgh
STAMP  := $(VENV)/.cgh-install-stamp
PYTEST_ARGS ?=

# transfer-voc: MoCo's protocol reports the mean of 5 seeds; the record says how many ran (extra.seeds)
CKPT     ?=
VOC_ROOT ?=
GPUS     ?= 1
SEEDS    ?= 5
# report
RESULTS    ?= runs
REPORT_DIR ?= report

.PHONY: install test demo report transfer-voc clean-venv

install:
	bash .ci/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m reports.demo --output demo_out

report: install
	$(CGH) report $(RESULTS) -o $(REPORT_DIR)

transfer-voc: install
	@test -n "$(CKPT)" || { echo "usage: make transfer-voc CKPT=path/to/checkpoint VOC_ROOT=path/to/VOCdevkit [GPUS=8] [SEEDS=5 (default)]"; exit 2; }
	@test -n "$(VOC_ROOT)" || { echo "usage: make transfer-voc CKPT=path/to/checkpoint VOC_ROOT=path/to/VOCdevkit [GPUS=8] [SEEDS=5 (default)]"; exit 2; }
	$(CGH) transfer voc --checkpoint $(CKPT) --voc-root $(VOC_ROOT) --gpus $(GPUS) --seeds $(SEEDS)

clean-venv:
	rm -rf $(VENV)
