# The commands of the README.
.PHONY: run test test-fast lint

run:
	scripts/setup.sh
	.venv/bin/editd run

test:
	scripts/setup.sh test
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The suite minus the tests that take long, start the embedded broker, or fetch SmolLM2.
test-fast:
	scripts/setup.sh
	.venv/bin/pytest -q -p no:cacheprovider -m "not slow and not broker and not real_model"

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
