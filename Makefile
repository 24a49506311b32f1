# medmoco: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch 2.13.0 is on local disk on our machines; installing it first
# keeps pip from pulling a multi-GB CUDA build for the `torch>=2.4` requirement.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test services bench experiment clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .[dev]
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipelines.demo --workdir demo-run

# Two pytest workers (pytest-xdist), one file per worker at a time so that a file's session
# fixtures (archive, cache) are built once per worker; conftest pins torch to one thread each.
TEST_WORKERS ?= 2
test: venv services
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile tests

# Debian tools the tests use, on loopback, started and stopped by PID by the tests themselves:
# SLURM (slurm-wlm + munge) for tests/test_slurm.py, dicom3tools' DICOM validator `dciodvfy` for
# tests/test_sr.py, and Orthanc with its DICOMweb plugin (orthanc + orthanc-dicomweb) for
# tests/test_dicomweb.py. Installed with apt where this runs as root with apt; elsewhere the tests
# that need them skip with a message naming what is missing. The orthanc package enables a system
# service; the tests never use it (they start Orthanc with their own config), so it is stopped.
SERVICE_PACKAGES := slurm-wlm munge dicom3tools
ORTHANC_PACKAGES := orthanc orthanc-dicomweb
services:
	@if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
	    && command -v dciodvfy >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(SERVICE_PACKAGES) for the tests (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SERVICE_PACKAGES) >/dev/null) \
	        || echo "could not install $(SERVICE_PACKAGES): the SLURM tests and the SR validation will skip"; \
	else echo "not root or no apt: $(SERVICE_PACKAGES) not installed, the SLURM tests and the SR validation will skip"; fi
	@if command -v Orthanc >/dev/null 2>&1 && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(ORTHANC_PACKAGES) for the tests (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(ORTHANC_PACKAGES) >/dev/null) \
	        || echo "could not install $(ORTHANC_PACKAGES): the DICOMweb tests will skip"; \
	    (service orthanc stop || systemctl stop orthanc) >/dev/null 2>&1 || true; \
	else echo "not root or no apt: $(ORTHANC_PACKAGES) not installed, the DICOMweb tests will skip"; fi

# The label-efficiency experiment on CPU (README section 4): data, pretraining, then the trials.
# Each step resumes or is skipped when its output exists. `make experiment EXP=DIR` puts every
# step's output under DIR (the configs' own paths are experiment-run/...).
EXP := experiment-run
experiment: venv
	test -f $(EXP)/archive/stage_2_train.csv || $(PY) -m medmoco synth --out $(EXP)/archive --patients 100 --seed 7 --rows 128 --slices 8,12
	$(PY) -m medmoco preprocess --config configs/preprocess/cpu_experiment.yaml --input $(EXP)/archive/stage_2_train \
	    --labels $(EXP)/archive/stage_2_train.csv --out $(EXP)/cache --quiet
	test -f $(EXP)/pretrain/backbone.pt || $(PY) -m medmoco pretrain --config configs/pretrain/cpu_experiment.yaml \
	    --cache $(EXP)/cache --run-dir $(EXP)/pretrain --resume auto --tracking-uri sqlite:///$(EXP)/mlflow.db
	$(PY) -m medmoco experiment --config configs/experiments/label_efficiency.yaml --tracking-uri sqlite:///$(EXP)/mlflow.db \
	    --set cache=$(EXP)/cache --set pretrained=$(EXP)/pretrain/backbone.pt --set run_dir=$(EXP)/experiment

bench: venv
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf demo-run experiment-run .pytest_cache
