# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench soak mutate clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check lightning_gradguard tests examples benchmarks
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no tests: that must fail loudly, not pass.
test: lint
	$(PY) -m pytest -m "not slow" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: venv
	$(PY) examples/vanishing_gradients.py

# Benchmarks (not part of `make test`): the step overhead (benchmarks/RESULTS.md), then the report
# and the tab at depth (benchmarks/RESULTS-depth.md), then recovery's cost (benchmarks/RESULTS-rollback.md),
# then the checkpoint gate's (benchmarks/RESULTS-checkpoints.md), then the guard under Hugging Face's Trainer
# (benchmarks/RESULTS-hf.md), then the replica check's (benchmarks/RESULTS-replicas.md).
bench: venv
	$(PY) benchmarks/bench.py
	cd benchmarks && ../$(PY) depth_bench.py
	cd benchmarks && ../$(PY) rollback_bench.py
	cd benchmarks && ../$(PY) why_bench.py
	cd benchmarks && ../$(PY) checkpoint_bench.py
	$(PY) benchmarks/hf_bench.py
	cd benchmarks && ../$(PY) replica_bench.py

# The slow tests (not part of `make test`): the soak run, the demo at 2 threads.
soak: venv
	$(PY) -m pytest -m slow -q tests

# Mutation testing (not part of `make test`; issue 33): mutmut mutates the modules that setup.cfg's [mutmut]
# names and runs the fast tests that cover each mutant, on one core (one to two hours). mutmut is installed here,
# pinned by constraints.txt, so that `make test` and the dev extra stay lean. mutants/ starts empty: mutmut
# keeps its copy of the whole package there and never refreshes an existing file, so an old copy would be
# tested. Prints the kill rate per module (fails below 85%); results: benchmarks/RESULTS-mutate.md.
mutate: venv
	$(PY) -m pip install --quiet --constraint constraints.txt mutmut
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 1
	$(VENV)/bin/mutmut results
	$(PY) benchmarks/mutate_summary.py --min 85

clean:
	rm -rf $(VENV) runs mutants .pytest_cache .mypy_cache .ruff_cache
