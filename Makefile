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

# The demo: meta-training, PGD-AT and AVG on the same data and loop (3 epochs of mnist5k), then all three on the
# same held-out attacks, test digits and adaptations, side by side (--resume: a second `make demo` only evaluates).
DEMO_ATTACKS := "torchattacks:PGD(eps=0.3, alpha=0.01, steps=40)" "pgd_l2(eps=2.0, steps=20)" "pgd_l1(eps=10, steps=20)"
demo: $(STAMP)
	$(VENV)/bin/metaadv train --config configs/mnist5k.yaml --out runs/demo/meta --resume
	$(VENV)/bin/metaadv train --config configs/mnist5k.yaml --method pgd_at --out runs/demo/pgd_at --resume
	$(VENV)/bin/metaadv train --config configs/mnist5k.yaml --method avg --out runs/demo/avg --resume
	$(VENV)/bin/metaadv compare runs/demo/meta runs/demo/pgd_at runs/demo/avg --n-examples 200 \
		--attacks $(DEMO_ATTACKS) --out runs/demo

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
