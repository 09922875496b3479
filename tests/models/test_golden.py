"""Seeded tiny models give the outputs recorded in tests/expect/: refactors cannot change numerics silently."""
import json
from pathlib import Path

import pytest
import torch

from tests.expect.make_golden import CASES, golden_output

GOLDEN = json.loads((Path(__file__).parents[1] / "expect" / "golden_models.json").read_text())["outputs"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_outputs(case):
    got = torch.tensor(golden_output(case))
    want = torch.tensor(GOLDEN[case])
    # Same seeds -> same init and inputs; 1e-5 absorbs only BLAS summation-order differences between CPUs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
