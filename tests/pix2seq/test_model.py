import pytest
import torch

from maskconv import create_model
from maskconv.pix2seq.model import Pix2Seq, top_p_top_k


def _model(backbone="test_convnextv2", vocab=300, max_len=40, img=32):
    enc = create_model(backbone, num_classes=0, **({"img_size": img} if "vit" in backbone else {}))
    m = Pix2Seq(enc, vocab, max_len, dim=32, depth=2, heads=4).eval()
    with torch.no_grad():  # non-trivial biases / norms so a wrong cache cannot hide behind zeros
        for p in m.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
        m.decoder.pos_embed.normal_(0, 1.0)  # positions matter: greedy tokens vary along the sequence
    return m


@pytest.mark.parametrize("backbone", ["test_convnextv2", "test_vit"])
def test_kv_cache_equals_full_decoding(backbone):
    m = _model(backbone)
    x = torch.randn(3, 3, 32, 32)
    prompt = torch.full((3, 1), 10)
    tok_c, log_c = m.generate(x, prompt, 30, greedy=True, use_cache=True)
    tok_u, log_u = m.generate(x, prompt, 30, greedy=True, use_cache=False)
    assert torch.equal(tok_c, tok_u)
    assert (log_c - log_u).abs().max() <= 1e-5
    # teacher forcing on the generated tokens gives the same logits as decoding step by step
    full = m(x, torch.cat([prompt, tok_c[:, :-1]], 1))
    assert (full - log_c).abs().max() <= 1e-5
    assert len(set(tok_c[0].tolist())) > 1  # not a degenerate constant sequence


def test_output_layer_is_the_token_embedding():
    m = _model()
    x, seq = torch.randn(1, 3, 32, 32), torch.randint(0, 300, (1, 5))
    before = m(x, seq)
    with torch.no_grad():
        m.decoder.token_embed.weight[7] += 1.0  # changes token 7's logit everywhere (tied), not only its input
    after = m(x, seq)
    assert (after[..., 7] - before[..., 7]).abs().min() > 1e-3
    assert sum(p.numel() for n, p in m.named_parameters() if p.shape == (300, 32)) == 300 * 32


def test_official_top_p_always_keeps_the_top_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.3, 0.35, 0.25, 0.1]]))
    kept = torch.isfinite(top_p_top_k(logits, top_p=0.4))
    assert kept.tolist() == [[True, False, False, False], [False, True, False, False]]
    kept = torch.isfinite(top_p_top_k(logits, top_p=0.81))  # inclusive cumsum <= p
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert torch.isfinite(top_p_top_k(logits, top_k=3)).sum(1).tolist() == [3, 3]


def test_sampling_with_low_top_p_is_greedy_when_confident():
    m = _model()
    x, prompt = torch.randn(2, 3, 32, 32), torch.full((2, 1), 10)
    greedy, logits = m.generate(x, prompt, 10, greedy=True)
    sampled, _ = m.generate(x, prompt, 10, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)
    with pytest.raises(ValueError, match="exceeds"):
        m.generate(x, prompt, 45, greedy=True)


@pytest.mark.parametrize("backbone", ["test_convnextv2", "test_vit"])
def test_build_pix2seq_every_trainable_parameter_gets_a_gradient(backbone):
    """The encoder's classifier norm takes no part (DDP would stop at step 2): it is frozen, its keys kept."""
    from maskconv.pix2seq.task import Pix2SeqOptions, build_pix2seq

    m = build_pix2seq(backbone, Pix2SeqOptions(dim=32, depth=1, heads=4), 64)
    m(torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 6))).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert any(not p.requires_grad for p in m.encoder.parameters())
