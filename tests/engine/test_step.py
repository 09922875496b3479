"""Sync-free steps (issue 17): every objective and the classifier step trace to one graph, the traced step gives
eager's loss and gradients, device masks keep the exact visible count and are world-size invariant, and the
loss watch finds the first non-finite micro-batch without reading the device per micro-batch."""
import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

from maskconv.engine.dist import DistInfo
from maskconv.engine.step import LossWatch
from maskconv.models import create_model
from maskconv.pretrain import create_objective
from maskconv.pretrain.masking import indexed_masks, num_visible, random_mask, visible_index, visible_positions

DEC = dict(decoder_dim=32, decoder_depth=1)
STEPS = {  # name -> (objective or model builder, input size): tiny, 32-64 px, batch 2
    "fcmae_gather": (lambda: create_objective("fcmae", model="test_convnextv2", sparse="gather", decoder_dim=32), 64),
    "fcmae_dense": (lambda: create_objective("fcmae", model="test_convnextv2", sparse="dense", decoder_dim=32), 64),
    "mae": (lambda: create_objective("mae", model="test_vit", decoder_heads=4, **DEC), 32),
    "convmae_gather": (lambda: create_objective("convmae", model="test_convmae", sparse="gather", decoder_heads=4,
                                                **DEC), 64),
    "convmae_dense": (lambda: create_objective("convmae", model="test_convmae", sparse="dense", decoder_heads=4,
                                               **DEC), 64),
    "classifier": (lambda: create_model("test_convnextv2", num_classes=3), 64),
}


def _step(name):
    """(module, step function, args): the training step's loss, as ``train.py`` computes it."""
    torch.manual_seed(0)
    build, px = STEPS[name]
    m = build().train()
    x = torch.randn(2, 3, px, px)
    if name == "classifier":
        return m, (lambda x, y: F.cross_entropy(m(x), y, label_smoothing=0.1)), (x, torch.tensor([0, 2]))
    h, w = m.grid(x)
    mask = indexed_masks(torch.tensor([3, 8]), 0, 0, h, w, m.mask_ratio)
    return m, (lambda x, mask: m(x, mask=mask, drawn=True).loss), (x, mask)  # as the engine's pretrain loss


@pytest.mark.parametrize("name", list(STEPS))
def test_step_traces_to_one_graph(name):
    """The table of issue 17 re-measured: graphs == 1, breaks == 0 (was 26/6/7/25/13 graphs at 224 px)."""
    _, fn, args = _step(name)
    dynamo.reset()
    e = dynamo.explain(fn)(*args)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [r.reason for r in e.break_reasons]


def _loss_and_grads(m, fn, args):
    m.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _compiled_equals_eager(name, backend):
    m, fn, args = _step(name)
    ref, ref_g = _loss_and_grads(m, fn, args)
    dynamo.reset()
    got, got_g = _loss_and_grads(m, torch.compile(fn, fullgraph=True, backend=backend), args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == ref_g.keys() and len(ref_g) > 4
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow  # 11-17 s each on the shared 2-core machine
@pytest.mark.parametrize("name", list(STEPS))
def test_traced_step_equals_eager(name):
    """fullgraph capture + AOT autograd (forward and backward graphs, no codegen): eager's loss and gradients."""
    _compiled_equals_eager(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STEPS))
def test_inductor_step_equals_eager(name):
    """``run.compile=true``'s backend (inductor, C++ codegen on CPU): eager's loss and gradients."""
    _compiled_equals_eager(name, "inductor")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's values back to the host (``.item()``, ``int()``, ``bool()``,
    ``.tolist()`` all go through ``_local_scalar_dense``; ``nonzero`` sizes its output from the values): on a
    GPU each is a device->host sync. Visible on the CPU, so the eager step's syncs are tested here."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [n for n in STEPS if n != "classifier"])
def test_eager_step_with_drawn_masks_reads_nothing_back(name):
    """The engine passes its masks as drawn: an eager forward + backward reads no value back to the host (no
    sync per micro-batch on a GPU) and gives the loss and gradients of the validated path, which does read the
    mask (the counter sees that read, so it would see one in the drawn path too)."""
    m, fn, (x, mask) = _step(name)
    with _HostReads() as drawn:
        loss = fn(x, mask)
        loss.backward()
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    with _HostReads() as checked:
        ref = m(x, mask=mask).loss
        ref.backward()
    assert drawn.reads == [], drawn.reads
    assert checked.reads, "the validated path reads the mask back: the counter must see it"
    assert torch.equal(loss, ref)
    for g, p in zip(grads, [p for p in m.parameters() if p.grad is not None]):
        assert torch.equal(g, p.grad)
    bad = mask.clone()
    bad[0].fill_(True)  # hides every patch of sample 0: refused when the mask is not declared drawn
    with pytest.raises(ValueError, match="same number of visible patches"):
        m(x, mask=bad)


def test_indexed_masks_count_seed_and_world_size_invariance():
    idx = torch.arange(16)
    m = indexed_masks(idx, epoch=2, seed=7, h=7, w=7, mask_ratio=0.6)
    assert m.shape == (16, 7, 7) and m.dtype == torch.bool
    assert ((~m).flatten(1).sum(1) == num_visible(49, 0.6)).all()
    assert len({tuple(r.tolist()) for r in m.flatten(1)}) == 16  # every sample its own mask
    assert torch.equal(m, indexed_masks(idx, 2, 7, 7, 7, 0.6))  # follows the seed
    # world-size invariant: a sample's mask depends on its global index, not on the batch it lands in
    perm = torch.randperm(16)
    assert torch.equal(indexed_masks(idx[perm], 2, 7, 7, 7, 0.6), m[perm])
    two = torch.cat([indexed_masks(idx[0::2], 2, 7, 7, 7, 0.6), indexed_masks(idx[1::2], 2, 7, 7, 7, 0.6)])
    assert torch.equal(two, torch.cat([m[0::2], m[1::2]]))
    assert not torch.equal(indexed_masks(idx, 3, 7, 7, 7, 0.6), m)  # another epoch
    assert not torch.equal(indexed_masks(idx, 2, 8, 7, 7, 0.6), m)  # another seed
    # each position is hidden about as often as the ratio says (no position bias): 4096 samples
    frac = indexed_masks(torch.arange(4096), 0, 0, 7, 7, 0.6).float().mean(0)
    assert (frac - (1 - num_visible(49, 0.6) / 49)).abs().max() < 0.05
    with pytest.raises(ValueError, match="leaves no visible patch"):
        indexed_masks(idx, 0, 0, 2, 2, 0.9)


def test_indexed_masks_trace_without_breaks():
    dynamo.reset()
    e = dynamo.explain(lambda i: indexed_masks(i, 1, 0, 4, 4, 0.75))(torch.arange(4))
    assert (e.graph_count, e.graph_break_count) == (1, 0)


def test_visible_index_is_nonzeros_without_the_sync():
    mask = random_mask(5, 6, 4, 0.5, generator=torch.Generator().manual_seed(0))
    keep = num_visible(24, 0.5)
    nz = (~mask).reshape(5, 24).nonzero()
    assert torch.equal(visible_index(mask, keep), nz[:, 0] * 24 + nz[:, 1])
    assert torch.equal(visible_positions(mask, keep), nz[:, 1].view(5, keep))


def test_loss_watch_names_the_first_non_finite_micro_batch():
    info = DistInfo()
    w = LossWatch(info.device)
    for i, v in enumerate([1.0, 2.0, 3.0]):
        if i == 0:
            w.new_step()
        w.update(torch.tensor(v), i)
    assert w.first_non_finite(info) is None and w.step_mean(3) == pytest.approx(2.0)
    w.new_step()
    w.update(torch.tensor(4.0), 3)
    w.update(torch.tensor(float("inf")), 4)
    w.update(torch.tensor(float("nan")), 5)  # a later one does not replace the first
    bad = w.first_non_finite(info)
    assert (bad.micro, bad.value) == (4, float("inf"))
    s = w.take_sum()
    assert s != s  # the sum holds the NaN: a non-finite epoch mean is never reported as a number
    assert w.take_sum() == 0.0


def test_compile_options_are_checked():
    from maskconv.config import ConfigError, load_config

    cfg = load_config(overrides=["run.compile=true", "run.compile_mode=max-autotune", "run.compile_dynamic=false"])
    assert (cfg.run.compile, cfg.run.compile_mode, cfg.run.compile_dynamic) == (True, "max-autotune", False)
    with pytest.raises(ConfigError, match="run.compile_mode"):
        load_config(overrides=["run.compile_mode=fast"])


@pytest.mark.slow  # two inductor compiles (train and eval-mode forward): minutes on CPU
def test_run_compile_logs_the_eager_losses(tmp_path):
    """``run.compile=true`` through the engine: the same logged losses as the eager run, to float tolerance."""
    import json

    from maskconv.cli import main

    args = ["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
            "data.num_workers=0", "run.progress=false", "objective.decoder_dim=32", "optim.epochs=1", "optim.lr=1e-3",
            "run.max_steps=3", "run.log_every_steps=1"]
    losses = {}
    for c in ("false", "true"):
        assert main([*args, "--out", str(tmp_path / c), f"run.compile={c}"]) == 0
        rows = [json.loads(x) for x in (tmp_path / c / "metrics.jsonl").read_text().splitlines()]
        losses[c] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["false"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
