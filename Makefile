# `make demo`, `make test` and `make docs` set everything up from nothing: a virtual environment in .venv with
# hessops installed (editable) and its test dependencies (mkdocs among them).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hessops demo --out demo/result.json --plot demo/demo.png

# The suite in TEST_WORKERS pytest-xdist processes (one file per worker at a time), each computing on one thread
# (tests/conftest.py): on 2 cores, 8 minutes instead of 14.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The documentation site (mkdocs.yml, docs/, docs_build/) into site/; the build fails on a broken link, a page
# left out of the nav or a formula latex2mathml cannot convert. Neither the build nor the site needs the network;
# the site's search needs it served: python -m http.server -d site.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo site .pytest_cache
