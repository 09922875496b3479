"""Registry-wide checks every tiny ``test_*`` variant must pass, so a new family is covered by registering it."""
import pytest
import torch

import maskconv

TINY = maskconv.list_models("test_*")


@pytest.mark.parametrize("name", TINY)
def test_in_chans_one_non_square(name):
    m = maskconv.create_model(name, in_chans=1, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        assert m(x).shape == (2, 3)
        feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [fi["num_chs"] for fi in m.feature_info]
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(fi["reduction"],) * 2 for fi in m.feature_info]
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 64, 96))
