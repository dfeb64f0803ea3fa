"""Deliberately broken operators, for tests/test_mutation.py: Python imports this module at the start of every
process that has this folder on its ``PYTHONPATH`` (the test's pytest run, and the command-line processes its
tests start). With ``HESSOPS_TEST_MUTATION="Kind:factor,..."`` set, the products of each ``hessops.Kind``
(``Hessian``, ``GGN``, ``EmpiricalFisher``, ``MCFisher``) are multiplied by its ``factor``: a formulation that is
1 % off, say."""

import os

_MUTATION = os.environ.get("HESSOPS_TEST_MUTATION")
if _MUTATION:
    import hessops

    for _item in _MUTATION.split(","):
        _kind, _factor = _item.split(":")
        _class = getattr(hessops, _kind)

        def _broken(self, X, _correct=_class._matmat, _factor=float(_factor)):
            return _correct(self, X) * _factor

        _class._matmat = _broken
