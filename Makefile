# Development tasks. Run them in an environment with emberfl installed editable
# (`maturin develop --release --extras test`); `make ci` needs none: it builds and
# installs everything itself, as CI does.
PYTHON ?= python
LINT_DIRS := python tests benches examples experiments

.PHONY: develop lint test-fast test ci

develop:  ## editable install of python/ and the compiled core, with the test extras
	maturin develop --release --extras test

lint:  ## formatting, lints, types and the compiled module's stub
	$(PYTHON) -m ruff check $(LINT_DIRS)
	$(PYTHON) -m ruff format --check $(LINT_DIRS)
	$(PYTHON) -m mypy python/emberfl
	cd /tmp && $(PYTHON) -m mypy.stubtest emberfl._core
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

test-fast:  ## the Rust core, and the Python suite without end-to-end and fault tests
	cargo test --release --locked
	$(PYTHON) -m pytest -m "not slow and not faults" -q

test:  ## the whole Python suite (README's test command)
	$(PYTHON) -m pytest

ci:  ## what CI runs, from this checkout
	bash .ci/run
