# Two commands do all set-up: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel from local disk on these machines; override on a GPU box, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,attacks]"
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metaadv train --config configs/mnist5k.yaml --out runs/demo
	$(VENV)/bin/metaadv eval --checkpoint runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check metaadv tests benchmarks docs/gen_api.py
	$(VENV)/bin/ruff format --check metaadv tests benchmarks docs/gen_api.py

format: $(STAMP)
	$(VENV)/bin/ruff format metaadv tests benchmarks docs/gen_api.py
	$(VENV)/bin/ruff check --fix metaadv tests benchmarks docs/gen_api.py

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
