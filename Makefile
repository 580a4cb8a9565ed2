# MetaQNN: every target wraps `python -m metaqnn ...` in the project's virtualenv.
#   make demo                 the embedded digits search on the CPU (README's main job)
#   make test                 lint, type check, Python 3.8 check, tests (installs everything)
#   make test-fast            the tests that run no caffe (under a minute): the edit-test loop
#   make search DATASET=svhn EXP=name GPU=0 SET="space.max_depth=8 agent.seed=3"
#   make search DATASET=svhn GPUS=0,1,2,3          one training per GPU, all at once
#   make search DATASET=svhn RAY=head-host:6379 GPUS=all   on a Ray cluster
#   make bench-early-stop     early stopping on real digits searches + prediction quality + paper-scale simulation (~1 h)
#   make chaos                kill -9 a digits search 24 times, resume, compare (not in `make test`: ~10 min)
#   make bench-constraints    digits searches under a parameter budget and the mnas latency reward (~20 min)
#   make bench-startup        search start-up data checks on a full-size synthetic SVHN, cold page cache (~2 min, 3 GB disk)
#   make bench-prepare        `prepare` of full-size synthetic SVHN and CIFAR-10, every preprocessing: time, peak RSS (~2 h, 12 GB disk)
#   make search DATASET=svhn GPUS=0,1 TRAININGS_PER_GPU=4  four small trainings share each GPU
#   make finish EXP=svhn FINISH_TOP=5     train the models early stopping stopped with the 5 highest predictions to the end
#   make caffe-gpu            Caffe 1.0 for NVIDIA GPUs in .deps/caffe-gpu (CUDA 13 from PyPI, ~25 min)
#   make device-bundle        what scripts/device-check.sh needs on a GPU machine (build/device-check)
#   make train DATASET=mnist FROM=experiments/cifar10/export/01_model00042 INIT=finetune   one architecture on one dataset
#       (or ARCH='[C(64,3,1), SM(10)]', NET=published.prototxt, EXP=name MODEL=N; PROTOCOL=, PROTOCOL_SET=, OUT=)
#   make transfer EXP=cifar10 TO=cifar100,svhn,mnist   Table 5: the best model on each target, scratch and finetuned
#   make tensorboard-serve EXP=svhn PORT=6006   TensorBoard on a search, live (README "Watching a search")
#   make tensorboard EXP=svhn                   write the event files of an experiment made before them (idempotent)
#   make tensorboard-screens EXP=digits OUT=docs/img   headless-Chromium screenshots of its Scalars and HParams views
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= digits
EXP ?=
TOP ?= 10
GPU ?=
GPUS ?=
WORKERS ?=
TRAININGS_PER_GPU ?=
RAY ?=
SOURCE ?=
SET ?=
PUBLISHED ?= ../shared/reference/published-caffe
# Inside a conda env the venv must see conda's pycaffe/caffe packages.
VENV_FLAGS ?= $(if $(CONDA_PREFIX),--system-site-packages,)

# Every value a user gives (EXP, DATASET, GPUS, SET items, FILE, ...) reaches the shell through q:
# one single-quoted word, its own quotes escaped, so `EXP="my exp"` is one argument and
# `EXP='a;echo X'` runs nothing.  SET and PROTOCOL_SET are split on spaces first, each item quoted.
q = '$(subst ','\'',$(1))'
exp_arg = $(if $(EXP),--exp $(call q,$(EXP)),)
exp_or_dataset = --exp $(call q,$(or $(EXP),$(DATASET)))
gpu_arg = $(if $(GPU),--gpu $(call q,$(GPU)),)
par_args = $(if $(GPUS),--gpus $(call q,$(GPUS)),) $(if $(WORKERS),--workers $(call q,$(WORKERS)),) \
           $(if $(RAY),--ray $(call q,$(RAY)),) \
           $(if $(TRAININGS_PER_GPU),--trainings-per-gpu $(call q,$(TRAININGS_PER_GPU)),)
src_arg = $(if $(SOURCE),--source $(call q,$(SOURCE)),)
set_args = $(foreach s,$(SET),--set $(call q,$(s)))
dataset_arg = --dataset $(call q,$(DATASET))
# the architecture of `make train` / `make transfer`: ARCH, NET, FROM, or EXP (+ MODEL)
source_args = $(if $(ARCH),--arch $(call q,$(ARCH)),) $(if $(NET),--net $(call q,$(NET)),) \
              $(if $(FROM),--from $(call q,$(FROM)),) $(exp_arg) $(if $(MODEL),--model $(call q,$(MODEL)),)
protocol_set_args = $(foreach s,$(PROTOCOL_SET),--protocol-set $(call q,$(s)))
out_arg = $(if $(OUT),--out $(call q,$(OUT)),)
both_inits := scratch,finetune

.PHONY: setup venv caffe caffe-gpu caffe-info device-bundle demo search status download data report export finetune ensemble compare regenerate-check arch train transfer \
        test test-fast lint typecheck py38 bench chaos clean finish bench-early-stop bench-constraints bench-startup bench-prepare \
        tensorboard tensorboard-viewer tensorboard-serve tensorboard-screens

setup: venv caffe

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# A CPU Caffe in a private prefix (.deps/caffe) when none is found; never touches system packages.
caffe:
	@if [ -n "$$CAFFE_BIN$$CAFFE_ROOT" ] || command -v caffe >/dev/null 2>&1; then \
	  echo "setup-caffe: using the caffe you have ($${CAFFE_BIN:-$${CAFFE_ROOT:-$$(command -v caffe)}})"; \
	else scripts/setup-caffe.sh; fi

# Caffe 1.0 for NVIDIA GPUs in a private prefix (.deps/caffe-gpu); never touches system packages.
#   GPU_ARCHS="80 90" GPU_PTX=90 (defaults; GPU_PTX=none: no PTX), CUDA_HOME=/usr/local/cuda-12.x for the user's own
#   toolkit, JOBS=N parallel compile jobs; a value given here is passed on quoted, even blank (and refused).
#   A no-op when already built with the same settings.
caffe-gpu:
	@$(foreach v,GPU_ARCHS GPU_PTX JOBS CUDA_HOME,$(if $(filter command line,$(origin $(v))),$(v)='$(subst ','\'',$($(v)))')) \
	  scripts/setup-caffe-gpu.sh

# What scripts/device-check.sh needs on a GPU machine without network (build/device-check, <= 60 MiB):
# the GPU caffe + libcaffe + small non-CUDA libraries (reference BLAS), wheels for Python 3.10-3.13, digits LMDBs.
device-bundle: caffe-gpu
	scripts/make-device-bundle.sh

caffe-info: venv
	$(PY) -m metaqnn caffe-info $(if $(GPU)$(GPUS),--gpu,)

demo: setup
	$(PY) -m metaqnn search --dataset digits $(exp_arg) $(set_args)
	$(PY) -m metaqnn report $(exp_arg)

search: setup
	$(PY) -m metaqnn search $(dataset_arg) $(exp_arg) $(gpu_arg) $(par_args) $(src_arg) $(set_args)

status: venv
	$(PY) -m metaqnn status $(exp_or_dataset)

download: venv
	$(PY) -m metaqnn download $(dataset_arg)

data: setup
	$(PY) -m metaqnn prepare $(dataset_arg) $(src_arg) $(set_args)

report: venv
	$(PY) -m metaqnn report $(exp_or_dataset)

finish: setup
	$(PY) -m metaqnn finish $(exp_or_dataset) --top $(call q,$(or $(FINISH_TOP),5)) $(gpu_arg)

export: venv
	$(PY) -m metaqnn export $(exp_or_dataset) --top $(call q,$(TOP))

finetune: setup
	$(PY) -m metaqnn finetune $(exp_or_dataset) --top $(call q,$(TOP)) $(gpu_arg)

ensemble: setup
	$(PY) -m metaqnn ensemble $(exp_or_dataset) --top $(call q,$(or $(ENSEMBLE_TOP),5)) $(gpu_arg)

train: setup
	$(PY) -m metaqnn train $(dataset_arg) $(source_args) --init $(call q,$(or $(INIT),scratch)) \
	  $(if $(PROTOCOL),--protocol $(call q,$(PROTOCOL)),) $(protocol_set_args) $(if $(WEIGHTS),--weights $(call q,$(WEIGHTS)),) \
	  $(gpu_arg) $(src_arg) $(set_args) $(out_arg)

transfer: setup
	$(PY) -m metaqnn transfer $(source_args) --to $(call q,$(TO)) --init $(call q,$(or $(INIT),$(both_inits))) \
	  $(protocol_set_args) $(gpu_arg) $(set_args) $(out_arg)

compare: venv
	$(PY) -m metaqnn compare $(call q,$(A)) $(call q,$(B)) $(if $(IGNORE_PATHS),--ignore-paths,)

regenerate-check: venv
	$(PY) -m metaqnn regenerate-check $(call q,$(FILE)) $(dataset_arg) $(foreach s,$(PROTOCOL_SET),--protocol-set $(call q,$(s)))

arch: venv
	$(PY) -m metaqnn arch $(call q,$(FILE))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# The users' conda Caffe is built for Python <= 3.8, which cannot be installed here:
# vermin checks that no syntax or library use needs a newer Python.
py38: venv
	$(VENV)/bin/vermin --no-tips --violations --eval-annotations -t=3.8- metaqnn_errors.py qagent metaqnn data_prep bench tests

test: setup lint typecheck py38
	METAQNN_PUBLISHED=$(call q,$(PUBLISHED)) $(PY) -m pytest -q tests

# The edit-test loop: everything that runs no caffe and takes no more than seconds (under a minute).
# CI (`make test`) runs everything.
test-fast: venv
	METAQNN_PUBLISHED=$(call q,$(PUBLISHED)) $(PY) -m pytest -q -m "not caffe and not slow" tests

bench: setup
	$(PY) bench/bench_agent.py
	$(PY) bench/bench_trainer_overhead.py
	$(PY) bench/bench_lmdb.py
	$(PY) bench/bench_parallel.py
	$(PY) bench/bench_disk_needs.py
	$(PY) bench/bench_status_scale.py

# Searching under a budget (issue 22), outside `make bench` (three digits searches, ~20 min on 2 cores):
# unconstrained, max_params at its 25th percentile, mnas on CPU latency; the comparison is printed.
BUDGET_OUT ?= build/bench-constraints
bench-constraints: setup
	$(PY) bench/bench_constraints.py --out $(call q,$(BUDGET_OUT))

# Start-up integrity checks at paper size (issue 25): writes a 2.9 GB synthetic SVHN folder under
# STARTUP_OUT, times the checks with a cold page cache (new, all-deep, old), removes the folder.
STARTUP_OUT ?= build/bench-startup
bench-startup: setup
	$(PY) bench/bench_startup_checks.py --out $(call q,$(STARTUP_OUT))

# Data preparation at paper size (issue 25): every preprocessing of full-size synthetic SVHN and
# CIFAR-10 at PREP_SCALES (fractions), wall time and peak RSS per run (target 8 GB), into PREP_OUT.
PREP_OUT ?= build/bench-prepare
PREP_SCALES ?= 0.25,1
bench-prepare: setup
	$(PY) bench/bench_prepare_scale.py --out $(call q,$(PREP_OUT)) --scales $(call q,$(PREP_SCALES))

# Crash consistency under SIGKILL (issue 11): slower than the CI suite, so outside `make test`.
CHAOS_OUT ?= /tmp/metaqnn-chaos
chaos: setup
	$(PY) bench/chaos_search.py --out $(call q,$(CHAOS_OUT)) --kills $(call q,$(or $(KILLS),24))

# Early stopping (issue 17), outside `make bench` (about an hour on 2 cores): real digits searches
# with and without a rule (SEEDS), then prediction quality and paper-scale simulation on their curves.
ES_OUT ?= build/bench-early-stop
SEEDS ?= 1 2 3
bench-early-stop: setup
	$(PY) bench/bench_early_stop_search.py --seeds $(foreach s,$(SEEDS),$(call q,$(s))) --out $(call q,$(ES_OUT))
	$(PY) bench/bench_early_stop.py quality --stores $(foreach s,$(SEEDS),$(call q,$(ES_OUT)/base-s$(s)/store.sqlite)) \
	  --out $(call q,$(ES_OUT))
	$(PY) bench/bench_early_stop.py simulate --stores $(foreach s,$(SEEDS),$(call q,$(ES_OUT)/base-s$(s)/store.sqlite)) \
	  --out $(call q,$(ES_OUT))

# Watching a search in TensorBoard (issue 23).  The search writes the event files itself (tensorboardX,
# in the dev and `tensorboard` extras); `make tensorboard` writes them for an experiment made before.
# The viewer lives in a virtualenv of its own, so its protobuf need not be the one Caffe's schema needs.
TB_VENV ?= .deps/tensorboard-venv
TENSORBOARD_SPEC ?= tensorboard>=2.12,<3
PORT ?= 6006
TB_HOST ?= 127.0.0.1
tensorboard: venv
	$(PY) -m metaqnn tensorboard $(exp_or_dataset)

tensorboard-viewer: $(TB_VENV)/.installed
$(TB_VENV)/.installed:
	@test -x $(TB_VENV)/bin/python || $(PYTHON) -m venv $(TB_VENV)
	$(TB_VENV)/bin/python -m pip install -q --upgrade pip
	$(TB_VENV)/bin/python -m pip install -q $(call q,$(TENSORBOARD_SPEC))
	@touch $@

tensorboard-serve: venv tensorboard-viewer
	$(PY) -m metaqnn tensorboard $(exp_or_dataset) --serve --viewer $(TB_VENV)/bin/tensorboard \
	  --host $(call q,$(TB_HOST)) --port $(call q,$(PORT))

# A real browser on the viewer (not in `make test`: it needs Debian's chromium, `apt-get install chromium`).
tensorboard-screens: venv tensorboard-viewer
	PY=$(PY) TB_VENV=$(TB_VENV) scripts/tensorboard-screens.sh $(call q,$(or $(EXP),$(DATASET))) $(call q,$(or $(OUT),docs/img))

clean:
	rm -rf $(VENV) .deps .pytest_cache .mypy_cache .ruff_cache
