"""Transformer Block / Attention / Mlp: timm's key names and numerics on the same weights."""
import pytest
import torch

from maskconv.layers import Attention, Block, Mlp

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _randomise(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("init_values", [None, 1e-1])
def test_block_state_dict_and_output_match_timm(init_values):
    ours = Block(32, num_heads=4, mlp_ratio=2.0, init_values=init_values).eval()
    ref = timm_vit.Block(32, num_heads=4, mlp_ratio=2.0, qkv_bias=True, init_values=init_values).eval()
    _randomise(ours)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours2 = Block(32, num_heads=4, mlp_ratio=2.0, init_values=init_values).eval()
    ours2.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        # same ops in the same order: only SDPA backend rounding differs
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours2(x), ref(x), rtol=1e-5, atol=1e-5)


def test_attention_is_softmax_qk_v():
    attn = Attention(16, num_heads=2).eval()
    _randomise(attn)
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
    w = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(3, 5, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_mask_blocks_tokens():
    attn = Attention(8, num_heads=2).eval()
    x = torch.randn(1, 4, 8)
    allowed = torch.tensor([True, True, False, False]).expand(4, 4)  # every query sees tokens 0, 1 only
    x2 = x.clone()
    x2[:, 2:] += 5.0
    with torch.no_grad():
        y, y2 = attn(x, attn_mask=allowed), attn(x2, attn_mask=allowed)
    # rows 0-1 read only tokens 0-1, which did not change
    torch.testing.assert_close(y[:, :2], y2[:, :2])


def test_mlp_keys_and_bad_heads():
    assert sorted(Mlp(4, 8).state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, num_heads=3)


def test_drop_path_is_per_sample_in_training_only():
    blk = Block(8, num_heads=2, drop_path=0.5)
    x = torch.randn(64, 3, 8)
    blk.eval()
    with torch.no_grad():
        ref = blk(x)
        torch.testing.assert_close(blk(x), ref)  # eval: deterministic
        blk.train()
        torch.manual_seed(0)
        y = blk(x)
    # some samples dropped both branches (output == input), others not: per-sample stochastic depth
    same = (y - x).abs().flatten(1).amax(1) == 0
    assert 0 < int(same.sum()) < 64
