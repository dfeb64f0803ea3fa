"""The tests of hessops, in folders that mirror its packages. The helpers they share (reference.py,
toy_networks.py, ...) live here and are imported by name: pyproject.toml's [tool.pytest.ini_options] puts this
folder on the path (``pythonpath = ["tests"]``)."""
