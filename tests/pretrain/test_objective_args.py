"""The objectives' shared argument checks (``pretrain/_base.check_objective_args``): one clear error each."""
import pytest

from maskconv.pretrain import create_objective

MODELS = {"fcmae": "test_convnextv2", "mae": "test_vit", "convmae": "test_convmae"}
CASES = [("fcmae", dict(mask_ratio=1.0), "mask_ratio must be in"), ("mae", dict(mask_ratio=0.0), "mask_ratio must be in"),
         ("convmae", dict(mask_ratio=1.5), "mask_ratio must be in"), ("fcmae", dict(decoder_depth=-1), "decoder_depth"),
         ("mae", dict(decoder_dim=0), "decoder_dim"), ("convmae", dict(decoder_depth=-2), "decoder_depth"),
         ("fcmae", dict(sparse="sparse"), "sparse must be 'gather' or 'dense'"),
         ("convmae", dict(sparse="minkowski"), "sparse must be 'gather' or 'dense'"),
         ("mae", dict(decoder_dim=32, decoder_heads=3), "divisible by decoder_heads 3"),
         ("convmae", dict(decoder_dim=30, decoder_heads=6), "and by 4"),
         ("mae", dict(decoder_heads=0), "decoder_heads")]


@pytest.mark.parametrize("name,kw,match", CASES)
def test_bad_objective_arguments_are_one_clear_error(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_objective(name, model=MODELS[name], **{"decoder_dim": 32, **kw})
