# Two commands on a fresh machine with Python 3.11:  make run   and   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test weights bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt requirements-dev-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --disable-pip-version-check --no-deps -r requirements-dev-nodeps.txt
	touch $(STAMP)

# Fetch the IR-101 WebFace12M weights from Hugging Face (fails with instructions when offline).
weights: $(STAMP)
	$(BIN)/python tools/fetch_weights.py

# Start the service on port 30035. The weights are checked first (and downloaded when none are
# configured or present); without them this stops before gunicorn starts, saying what to do
# (ADAFACE_WEIGHTS=synthetic to try the service).
run: $(STAMP)
	@$(BIN)/python tools/check_weights.py
	$(BIN)/gunicorn -c gunicorn.conf.py flask_http_server:app

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/model.py
	$(BIN)/python bench/mtcnn.py --limit 12

clean:
	rm -rf $(VENV) .pytest_cache
