"""The suite catches a broken product: with every operator's products made 1 % off (MCFisher's 2 %;
tests/mutation/sitecustomize.py, in a child pytest process and the command-line processes it starts), the tests
that check each operator's numbers against independent references must fail: its products, its blocks, MCFisher's
exact expectation and the command line. The first-order witness
is switched off (``HESSOPS_WITNESS=0``) so that the tests' references, not the library's own check, must catch it;
with the witness on, the first product is refused instead (tests/operators/test_witness.py).

One child pytest run over the chosen tests (each builds one kind of operator, so one run can break them all):
every one of them must fail."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TESTS = Path(__file__).parent
BROKEN = "Hessian:1.01,GGN:1.01,EmpiricalFisher:1.01,MCFisher:1.02"
CATCHERS = [  # each checks one operator's numbers against a reference that does not use its products
    "tests/operators/test_operators.py::test_matmat_matches_dense[mlp-ce-one-hessian]",
    "tests/operators/test_operators.py::test_matmat_matches_dense[mlp-ce-one-ggn]",
    "tests/operators/test_operators.py::test_matmat_matches_dense[mlp-ce-one-ef]",
    "tests/operators/test_mcfisher.py::test_mc_fisher_is_unbiased_for_its_exact_expectation[ce]",
    "tests/analysis/test_blocks.py::test_each_block_matches_the_dense_hessians_diagonal_block[transformer]",
    "tests/cli/test_cli.py::test_eigs_writes_json_and_plot_matching_the_dense_spectrum",
]


def test_products_one_percent_off_fail_the_tests_that_check_them(tmp_path):
    report = tmp_path / "report.xml"
    env = {
        **os.environ,
        "HESSOPS_TEST_MUTATION": BROKEN,
        "HESSOPS_WITNESS": "0",
        "PYTHONPATH": os.pathsep.join([str(TESTS / "mutation"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *CATCHERS],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard, not a time limit
    )
    cases = list(ElementTree.parse(report).getroot().iter("testcase"))
    assert len(cases) == len(CATCHERS), f"not every test was collected:\n{run.stdout[-3000:]}"
    passed = [case.get("name") for case in cases if not [child for child in case if child.tag in ("failure", "error")]]
    assert not passed, f"products off ({BROKEN}), yet these passed: {passed}"
