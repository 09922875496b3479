"""Hugging Face transformers: ViTMAE (``ViTMAEForPreTraining``) weights into our MAE objective and ViT with the
same loss / features as HF's own model; ConvNeXt V1 / V2 written in HF's layout, read by transformers with the
same logits, and read back by maskconv."""
import json

import pytest
import torch

import maskconv
from maskconv.models import CheckpointError, load_checkpoint
from maskconv.models.hub import save_transformers
from maskconv.pretrain import create_objective
from tests.conftest import perturbed_state_dict

transformers = pytest.importorskip("transformers")

GRID = 4  # 32 px images, 8 px patches


def _hf_mae(mask_ratio=0.75, norm_pix_loss=True):
    """HF's own ViTMAEForPreTraining at a tiny size, random weights, with its fixed sin-cos tables as a pretrained
    checkpoint stores them (transformers 5 leaves them at zero in a model built from a config)."""
    cfg = transformers.ViTMAEConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
        layer_norm_eps=1e-6)  # the official MAE's eps (HF's config default is 1e-12)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    hf.vit.embeddings.initialize_weights()
    hf.decoder.initialize_weights(GRID * GRID)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:  # everything trained (not the fixed tables): LN, biases, tokens included
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return hf


def _our_mae(norm_pix_loss=True):
    return create_objective("mae", model="vit_tiny_patch16_224", decoder_dim=16, decoder_depth=2, decoder_heads=2,
                            norm_pix_loss=norm_pix_loss, model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32,
                                                                           depth=2, num_heads=4)).eval()


def _mask_from_noise(noise, keep):
    """HF's masking as our bool mask: the ``keep`` patches with the smallest noise are visible (True = masked)."""
    mask = torch.ones_like(noise, dtype=torch.bool)
    mask.scatter_(1, noise.argsort(dim=1)[:, :keep], False)
    return mask


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_vitmae_loads_strict_into_the_mae_objective_with_hf_loss(norm_pix_loss):
    hf = _hf_mae(norm_pix_loss=norm_pix_loss)
    ours = _our_mae(norm_pix_loss)
    report = load_checkpoint(ours, hf.state_dict(), strict=True)
    assert report.layout == "hf-mae-pretrain" and report.loaded == len(ours.state_dict()) and not report.skipped
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, GRID * GRID)
    with torch.no_grad():
        want = hf(pixel_values=x, noise=noise)
        got = ours(x, _mask_from_noise(noise, GRID * GRID // 4).view(3, GRID, GRID))
    assert torch.equal(got.mask.flatten(1), want.mask.bool())
    assert (got.pred - want.logits).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * max(1.0, abs(want.loss.item()))


def test_hf_vitmae_files_from_transformers_save_pretrained_load_too(tmp_path):
    """transformers writes the Hub's names (``encoder.layer.i.attention.attention.query``), not its module names."""
    hf = _hf_mae()
    hf.save_pretrained(tmp_path)
    ours = _our_mae()
    # the folder itself is a source too (local-dir:, or hf-hub:facebook/vit-mae-base from the HF cache)
    assert load_checkpoint(ours, f"local-dir:{tmp_path}", strict=True).layout == "hf-mae-pretrain"
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, GRID * GRID)
    with torch.no_grad():
        want = hf(pixel_values=x, noise=noise).loss
        got = ours(x, _mask_from_noise(noise, GRID * GRID // 4).view(2, GRID, GRID)).loss
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


def test_hf_vitmae_encoder_into_vit_gives_hf_features():
    hf = _hf_mae(mask_ratio=0.0)  # every patch visible: HF's encoder output is the backbone's
    vit = maskconv.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32,
                                depth=2, num_heads=4).eval()
    report = load_checkpoint(vit, hf.state_dict(), strict=True)  # the decoder is dropped
    assert report.layout == "hf-mae-pretrain" and report.loaded == len(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    noise = torch.arange(GRID * GRID, dtype=torch.float).expand(2, -1)  # keeps HF's token order
    with torch.no_grad():
        want = hf.vit(pixel_values=x, noise=noise).last_hidden_state  # (B, 1 + L, D), final layernorm applied
        got = vit.forward_features(x)
    assert (got - want).abs().max().item() <= 1e-5


def test_hf_vit_classifier_loads_into_vit_with_equal_logits():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, num_labels=5, layer_norm_eps=1e-6)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.load_state_dict(perturbed_state_dict(hf))
    vit = maskconv.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, embed_dim=32,
                                depth=2, num_heads=4).eval()
    assert load_checkpoint(vit, hf.state_dict(), strict=True).layout == "hf-timm"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (vit(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_hf_vitmae_with_a_zero_decoder_table_is_refused():
    """The objective computes the decoder's sin-cos table instead of reading it: a checkpoint whose table is not
    that table (here transformers 5's uninitialised zeros) must not be read as if it were."""
    hf = transformers.ViTMAEForPreTraining(_hf_mae().config)
    with pytest.raises(CheckpointError, match="decoder_pos_embed .* not MAE's fixed 2-D sin-cos table"):
        load_checkpoint(_our_mae(), hf.state_dict(), strict=True)


def test_hf_vit_checkpoint_missing_a_projection_is_refused():
    sd = {k: v for k, v in _hf_mae().state_dict().items() if "layers.1.attention.k_proj.weight" not in k}
    with pytest.raises(CheckpointError, match="not all of query/key/value weight for blocks.1."):
        load_checkpoint(_our_mae(), sd)


@pytest.mark.parametrize("name,hf_class", [("test_convnextv2", "ConvNextV2ForImageClassification"),
                                           ("convnextv2_atto", "ConvNextV2ForImageClassification"),
                                           ("test_convnext", "ConvNextForImageClassification")])
def test_convnext_written_in_hf_layout_gives_transformers_the_same_logits(tmp_path, name, hf_class):
    ours = maskconv.create_model(name, num_classes=5).eval()
    ours.load_state_dict(perturbed_state_dict(ours))
    folder = save_transformers(ours, tmp_path / "hf", label_names=list("abcde"))
    hf, info = getattr(transformers, hf_class).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.id2label[4] == "e"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hf.eval()(pixel_values=x).logits - ours(x)).abs().max().item() <= 1e-5
    back = maskconv.create_model(name, num_classes=5)
    assert load_checkpoint(back, folder / "model.safetensors").layout == "hf"
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert json.loads((folder / "config.json").read_text())["maskconv"]["model"] == name
    if not name.startswith("test_"):  # an HF folder builds the registered size with its depths and widths
        again = maskconv.from_pretrained(folder).eval()
        assert again.pretrained_cfg["architecture"] == name and again.num_classes == 5
        with torch.no_grad():
            assert torch.equal(again(x), ours(x))


def test_an_hf_convnextv2_folder_written_by_transformers_builds_and_loads(tmp_path):
    cfg = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=4)  # atto
    hf = transformers.ConvNextV2ForImageClassification(cfg).eval()
    hf.load_state_dict(perturbed_state_dict(hf))
    hf.save_pretrained(tmp_path)
    ours = maskconv.from_pretrained(tmp_path).eval()
    assert ours.pretrained_cfg["architecture"] == "convnextv2_atto" and ours.num_classes == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # HF's final LayerNorm runs at its config's eps 1e-12, ours at the official 1e-6
        assert (ours(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5
    cfg.hidden_sizes = [40, 80, 160, 321]
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    with pytest.raises(CheckpointError, match="no maskconv convnextv2 size has depths"):
        maskconv.from_pretrained(tmp_path)


def test_models_hf_convnext_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ValueError, match="has no HF layout"):
        save_transformers(maskconv.create_model("test_slak"), tmp_path / "a")
    with pytest.raises(ValueError, match="HF's ConvNeXt"):
        save_transformers(maskconv.create_model("test_vit"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
