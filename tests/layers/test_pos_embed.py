"""2-D sin-cos table (facebookresearch/mae util/pos_embed.py) and pos-embed resampling (timm / MAE)."""
import numpy as np
import pytest
import torch

from maskconv.layers import resample_pos_embed, sincos_pos_embed_2d


def _official_2d(embed_dim, gh, gw, cls_token=False):
    """Transcription of MAE's numpy get_2d_sincos_pos_embed, generalised to gh x gw as ConvMAE/DiT do."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # here w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


@pytest.mark.parametrize("dim,gh,gw", [(16, 4, 4), (32, 3, 5), (64, 14, 14)])
def test_sincos_matches_official_formula(dim, gh, gw):
    ours = sincos_pos_embed_2d(dim, (gh, gw), cls_token=True)
    assert ours.shape == (1 + gh * gw, dim) and ours.dtype == torch.float32
    assert torch.equal(ours[0], torch.zeros(dim))
    # both compute in float64 and round once to float32: a 1-ulp tolerance covers libm differences
    torch.testing.assert_close(ours, _official_2d(dim, gh, gw, cls_token=True), rtol=1e-6, atol=1e-7)
    if gh == gw:  # an int grid size is the square grid
        torch.testing.assert_close(sincos_pos_embed_2d(dim, gh), ours[1:])


def test_sincos_first_half_encodes_columns():
    emb = sincos_pos_embed_2d(8, (3, 5))  # (15, 8)
    grid = emb.view(3, 5, 8)
    # moving along a row (column index changes) changes only the first half
    assert torch.equal(grid[1, 0, 4:], grid[1, 3, 4:]) and not torch.equal(grid[1, 0, :4], grid[1, 3, :4])
    assert torch.equal(grid[0, 2, :4], grid[2, 2, :4]) and not torch.equal(grid[0, 2, 4:], grid[2, 2, 4:])


def test_sincos_vs_transformers_layout():
    """HF ViTMAE's current table puts the row (h) half first: it is ours with halves swapped (our order is
    the official MAE one, which released checkpoints were trained with)."""
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    fn = getattr(vit_mae, "build_2d_sinusoidal_position_embedding", None)
    if fn is None:
        pytest.skip("this transformers version has no build_2d_sinusoidal_position_embedding")
    hf = fn(3, 5, 16, cls_token=True)
    ours = sincos_pos_embed_2d(16, (3, 5), cls_token=True)
    torch.testing.assert_close(torch.cat([ours[:, 8:], ours[:, :8]], dim=1), hf.float(), rtol=1e-6, atol=1e-7)


def test_sincos_bad_dim():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(6, 4)


@pytest.mark.parametrize("old,new,antialias", [((4, 4), (6, 3), True), ((5, 5), (3, 3), True), ((5, 5), (3, 4), False),
                                               ((2, 3), (4, 6), True)])
def test_resample_matches_timm(old, new, antialias):
    timm_pos = pytest.importorskip("timm.layers.pos_embed")
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + old[0] * old[1], 12)
    ours = resample_pos_embed(pe, new, old_size=old, antialias=antialias)
    ref = timm_pos.resample_abs_pos_embed(pe, list(new), old_size=list(old), num_prefix_tokens=1, antialias=antialias)
    assert ours.shape == (1, 1 + new[0] * new[1], 12)
    assert torch.equal(ours[:, :1], pe[:, :1])  # cls row kept untouched
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_resample_mae_style_upsampling_is_plain_bicubic():
    """MAE's interpolate_pos_embed: bicubic, align_corners=False, no antialias, no prefix in the interpolation."""
    torch.manual_seed(0)
    pe = torch.randn(1, 4 * 4, 8)
    grid = pe.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 49, 8)
    torch.testing.assert_close(resample_pos_embed(pe, 7, num_prefix_tokens=0, antialias=False), ref, rtol=0, atol=0)


def test_resample_same_size_and_dtype():
    pe = torch.randn(1, 1 + 9, 4, dtype=torch.bfloat16)
    assert resample_pos_embed(pe, (3, 3)) is pe
    assert resample_pos_embed(pe, (5, 2)).dtype == torch.bfloat16


def test_resample_bad_inputs():
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(torch.randn(1, 1 + 6, 4), (3, 3))
    with pytest.raises(ValueError, match="old_size"):
        resample_pos_embed(torch.randn(1, 1 + 6, 4), (3, 3), old_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(1, N, C\)"):
        resample_pos_embed(torch.randn(10, 4), (3, 3))
