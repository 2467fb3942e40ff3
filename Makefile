# rerankd: `make demo` runs the main job, `make test` runs the tests. Both set up a venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint proto proto-check bench bench-curve models clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rerankd.cli demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

bench: $(STAMP)
	$(PY) bench/rerank_throughput.py

bench-curve: $(STAMP)
	$(PY) bench/matryoshka_curve.py

# The recipe behind the shipped rerankers (hours on 2 cores): train, fit fusion, publish,
# evaluate, write the model cards. Stages: --stages teacher,student,fusion,publish,eval,card
models: $(STAMP)
	$(PY) scripts/build_models.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
