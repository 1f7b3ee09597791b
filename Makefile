# The two commands of the README.
.PHONY: run test lint

run:
	scripts/setup.sh
	.venv/bin/editd run

test:
	scripts/setup.sh test
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
