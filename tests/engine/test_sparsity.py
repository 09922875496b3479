"""Dynamic sparse training (engine/sparsity.py): exact densities at init and after every prune/regrow update,
masked weights and momenta stay zero under AdamW + weight decay, regrowth only from inactive positions,
ERK/SNIP layer densities, EMA rule, checkpoint resume through the engine, DDP agreement, bad config."""
import copy
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from maskconv.config import ConfigError, load_config
from maskconv.engine.sparsity import DynamicSparsity, allocate_counts, build_sparsity, erk_densities


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and on a busy machine 2+ threads spin-wait badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net() -> nn.Module:
    """Layers of different shapes: dense 3x3 conv, depthwise 7x7, 1x1 conv, linear."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 7, padding=3, groups=8),
                         nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _ce(m, x, y):
    return F.cross_entropy(m(x), y)


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(model, sp, steps, opt=None, update=True, start=0):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for s in range(start + 1, start + steps + 1):
        x, y = _batch(s)
        _ce(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if update:
            sp.step(opt, s)
    return opt


def _check_exact(sp: DynamicSparsity, model: nn.Module, active_total: int):
    params = dict(model.named_parameters())
    assert sum(sp.counts.values()) == active_total
    for n in sp.names:
        w = params[n].detach()
        if n in sp.masks:
            assert int(sp.masks[n].sum()) == sp.counts[n], n
            assert torch.all(w[~sp.masks[n]] == 0), n
        assert int((w != 0).sum()) <= sp.counts[n], n  # no weight outside the mask is alive
    assert sp.global_sparsity == pytest.approx(1 - active_total / sp.total, abs=0)


@pytest.mark.parametrize("init", ["uniform", "erk", "snip"])
def test_exact_sparsity_after_init_and_every_update(init):
    model = _net()
    sp = DynamicSparsity(model, 0.7, init=init, prune_rate=0.5, update_every=1, total_steps=100)
    sp.init_masks(_ce, _batch())
    target = round(0.3 * sp.total)
    _check_exact(sp, model, target)
    counts = dict(sp.counts)
    before = {n: m.clone() for n, m in sp.masks.items()}
    opt = _train(model, sp, 5)  # 5 prune/regrow updates
    _check_exact(sp, model, target)
    assert sp.counts == counts  # every layer's density held
    assert any(not torch.equal(before[n], sp.masks[n]) for n in sp.masks)  # and the masks did move
    for n, m in sp.masks.items():  # the optimizer state of masked weights is zero too
        p = dict(model.named_parameters())[n]
        assert torch.all(opt.state[p]["exp_avg"][~m] == 0) and torch.all(opt.state[p]["exp_avg_sq"][~m] == 0)


def test_masked_weights_stay_zero_under_adamw_weight_decay():
    torch.manual_seed(0)
    model = _net()
    sp = DynamicSparsity(model, 0.6, init="uniform", update_every=0, total_steps=10)  # fixed mask
    sp.init_masks()
    ref = _net()
    ref.load_state_dict(model.state_dict())
    _train(model, sp, 4)
    _check_exact(sp, model, round(0.4 * sp.total))
    # control: the same steps without masking revive the zeros (momentum + gradients reach them)
    _train(ref, sp, 4, update=False)
    w = dict(ref.named_parameters())
    assert all(bool((w[n].detach()[~m] != 0).any()) for n, m in sp.masks.items())


def test_regrowth_picks_only_inactive_positions_which_start_at_zero():
    model = _net()
    sp = DynamicSparsity(model, 0.5, init="erk", update_every=0, total_steps=10)
    sp.init_masks()
    opt = _train(model, sp, 3)  # weights and momenta move away from init
    params = dict(model.named_parameters())
    old = {n: m.clone() for n, m in sp.masks.items()}
    w_old = {n: params[n].detach().clone() for n in sp.masks}
    moved = sp.update(0.3, opt)
    assert moved, "nothing was pruned"
    for n, m in sp.masks.items():
        grown, pruned, kept = m & ~old[n], old[n] & ~m, old[n] & m
        k = min(math.ceil(0.3 * sp.counts[n]), sp.sizes[n] - sp.counts[n])
        assert int(grown.sum()) == int(pruned.sum()) == k == moved.get(n, 0), n  # a re-picked one would miss
        assert torch.all(params[n].detach()[grown] == 0), n
        assert torch.all(opt.state[params[n]]["exp_avg"][grown] == 0), n
        assert torch.all(params[n].detach()[pruned] == 0), n
        if k:  # magnitude pruning: every pruned weight was no larger than every kept one
            assert w_old[n][pruned].abs().max() <= w_old[n][kept].abs().min(), n


def test_prune_rate_decays_by_cosine_to_the_floor():
    sp = DynamicSparsity(_net(), 0.5, init="uniform", prune_rate=0.5, min_prune_rate=0.01, total_steps=100)
    assert sp.prune_rate_at(0) == pytest.approx(0.5)
    assert sp.prune_rate_at(50) == pytest.approx(0.01 + 0.49 * 0.5)
    assert sp.prune_rate_at(100) == pytest.approx(0.01) and sp.prune_rate_at(150) == pytest.approx(0.01)


def test_erk_densities_average_to_target_and_follow_the_formula():
    model = _net()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim in (2, 4)}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    for density in (0.1, 0.3, 0.8):
        d = erk_densities(shapes, density)
        assert all(0 < v <= 1 for v in d.values())
        assert sum(d[n] * sizes[n] for n in d) == pytest.approx(density * sum(sizes.values()), rel=1e-12)
        free = [n for n in d if d[n] < 1]
        for a in free:  # density_l / density_m = raw_l / raw_m with raw = sum(shape) / prod(shape)
            for b in free:
                assert d[a] / d[b] == pytest.approx((sum(shapes[a]) / sizes[a]) / (sum(shapes[b]) / sizes[b]))
    assert any(v == 1.0 for v in erk_densities(shapes, 0.8).values())  # small layers saturate
    sp = DynamicSparsity(model, 0.7, init="erk")
    sp.init_masks()
    dens = sp.layer_density()
    assert sum(dens[n] * sp.sizes[n] for n in dens) == round(0.3 * sp.total)
    assert len({round(v, 3) for v in dens.values()}) > 1  # not uniform


def test_allocate_counts_is_exact_and_capped():
    sizes = {"a": 7, "b": 13, "c": 100}
    c = allocate_counts({"a": 1.0, "b": 0.55, "c": 0.333}, sizes, 48)
    assert sum(c.values()) == 48 and c["a"] == 7 and all(0 <= c[k] <= sizes[k] for k in c)


def test_snip_uses_the_scores_keeps_the_target_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _net()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    sp = DynamicSparsity(model, 0.8, init="snip")
    sp.init_masks(_ce, _batch())
    assert torch.equal(torch.get_rng_state(), rng)  # the run's RNG stream is untouched
    assert all(p.grad is None for p in model.parameters())
    assert sum(sp.counts.values()) == round(0.2 * sp.total)
    base = sp.layer_density()
    # the scoring copy, not the model, received gradients; only masked-out weights changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k] * sp.masks[k]) if k in sp.masks else torch.equal(v, sd[k]), k
    # per-layer counts are those of the official rule: global threshold on |w * dCE/dw| over one batch
    ref = _net()
    ref.load_state_dict(sd)
    _ce(ref, *_batch()).backward()
    scores = {n: (p.detach() * p.grad).abs() for n, p in ref.named_parameters() if n in sp.names}
    thr = torch.cat([v.flatten() for v in scores.values()]).kthvalue(sp.total - round(0.2 * sp.total) + 1).values
    assert {n: int((v >= thr).sum()) for n, v in scores.items()} == sp.counts
    assert len({round(v, 3) for v in base.values()}) > 1  # the densities differ between layers


def test_ema_is_masked_and_regrown_positions_copy_the_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _net()
    sp = DynamicSparsity(model, 0.5, init="uniform", update_every=2, total_steps=100)
    sp.init_masks()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(1, 5):
        x, y = _batch(s)
        _ce(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        changed = sp.step(opt, s)
        grown = {n: g.clone() for n, g in sp._grown.items()} if changed else {}
        w = dict(model.named_parameters())
        with torch.no_grad():  # regrown weights start at 0, where copying and averaging agree: give them a
            for n, g in grown.items():  # value, so only the copy rule makes the EMA equal it (averaging: 0.1x)
                w[n][g] = 1.0
        ema.update_parameters(model)
        sp.mask_ema(ema.module)
        e = dict(ema.module.named_parameters())
        for n, m in sp.masks.items():
            assert torch.all(e[n][~m] == 0), n
            if n in grown:
                assert torch.all(e[n][grown[n]] == 1.0), n
            if s == 1:  # between updates the EMA is a plain average of the masked weights
                assert torch.equal(e[n], w[n].detach()), n  # (AveragedModel copies at its first update)
    assert grown and sp._grown == {}, "no update at step 4, or its grown positions were not consumed"


def test_state_dict_round_trip_continues_identically():
    model = _net()
    sp = DynamicSparsity(model, 0.5, init="erk", update_every=1, total_steps=100, seed=3)
    sp.init_masks()
    opt = _train(model, sp, 2)
    sd = sp.state_dict()
    twin = _net()
    twin.load_state_dict(model.state_dict())
    sp2 = DynamicSparsity(twin, 0.5, init="erk", update_every=1, total_steps=100, seed=99)  # seed comes from sd
    sp2.load_state_dict(sd)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a plain state_dict shares its tensors
    _train(model, sp, 3, opt, start=2)
    _train(twin, sp2, 3, opt2, start=2)
    for n in sp.masks:
        assert torch.equal(sp.masks[n], sp2.masks[n]), n
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n
    wrong = DynamicSparsity(_net(), 0.6, init="erk")
    with pytest.raises(ValueError, match="dynamic_sparsity.sparsity=0.5"):
        wrong.load_state_dict(sd)


# ---- through the engine ---------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _fit(out, overrides, stop_at=None):
    """A finetune run of test_convnextv2 on synthetic data via the engine; ``stop_at``: crash in that forward."""
    from maskconv import create_model
    from maskconv.data.build import build_dataset, build_transform
    from maskconv.engine.loop import fit

    cfg = load_config(overrides=["task=finetune", "model.name=test_convnextv2", "data.path=synthetic", "data.img_size=32",
                                 "data.batch_size=8", "data.num_workers=0", "run.progress=false", "optim.epochs=2",
                                 "optim.blr=1e-2", "run.save_every_steps=6", "run.log_every_steps=1",
                                 f"run.out={out}", *overrides])
    torch.manual_seed(0)
    model = create_model("test_convnextv2", num_classes=4)
    ds = build_dataset(cfg.data, 3, "train", labeled=True)
    tf = build_transform(cfg.data, 3, train=True)
    calls = [0]

    def loss_fn(m, x, y):
        calls[0] += 1
        if stop_at is not None and calls[0] == stop_at:
            raise _Stop
        return F.cross_entropy(m(x), y)

    return fit(cfg, model, ds, tf, loss_fn, task="finetune")


SPARSE = ["dynamic_sparsity.sparsity=0.5", "dynamic_sparsity.update_every=3", "dynamic_sparsity.prune_rate=0.5",
          "optim.ema_decay=0.9"]


def test_engine_resume_gives_the_same_weights_and_masks(tmp_path):
    ref = _fit(tmp_path / "ref", SPARSE)  # 16 steps, updates at 3, 6, 9, 12, 15
    with pytest.raises(_Stop):
        _fit(tmp_path / "cut", SPARSE, stop_at=8)  # SNIP's forward is call 1: 6 steps done and saved
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state"]["step"] == 6
    res = _fit(tmp_path / "cut", SPARSE)
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["sparse"]["masks"].keys() == b["sparse"]["masks"].keys() and a["sparse"]["masks"]
    for n in a["sparse"]["masks"]:
        assert torch.equal(a["sparse"]["masks"][n], b["sparse"]["masks"][n]), n
    assert torch.equal(a["sparse"]["generator"], b["sparse"]["generator"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert res.state.step == ref.state.step == 16


def test_engine_refuses_to_switch_sparse_and_dense_on_resume(tmp_path):
    with pytest.raises(_Stop):
        _fit(tmp_path / "s", SPARSE, stop_at=8)
    with pytest.raises(ValueError, match="dynamic_sparsity.sparsity 0.5 -> 0.0"):  # a config change: refused as any other
        _fit(tmp_path / "s", [])
    allow = ["run.allow_config_change=true"]  # and refused even when config changes are allowed:
    with pytest.raises(ValueError, match="sparse run"):  # dense resume would regrow the pruned weights
        _fit(tmp_path / "s", allow)
    with pytest.raises(_Stop):
        _fit(tmp_path / "d", [], stop_at=8)
    with pytest.raises(ValueError, match="dense run"):
        _fit(tmp_path / "d", [*SPARSE, *allow])


def test_engine_amp_keeps_exact_sparsity_in_model_and_ema(tmp_path):
    import json

    _fit(tmp_path / "r", [*SPARSE, "run.amp=bf16", "dynamic_sparsity.init=erk", "dynamic_sparsity.include=mlp"])
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    sd = ck["sparse"]
    masks, counts = sd["masks"], dict(zip(sd["names"], sd["counts"]))
    assert masks and all(".mlp.fc" in n for n in sd["names"])  # include=mlp: the MLP convs only
    total = sum(ck["model"][n].numel() for n in counts)  # ERK may leave some layers dense (no mask)
    assert sum(counts.values()) == round(0.5 * total)
    assert all(int(m.sum()) == counts[n] for n, m in masks.items())
    for n, m in masks.items():
        assert torch.all(ck["model"][n][~m] == 0), n
        assert torch.all(ck["ema"]["module." + n][~m] == 0), n
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 16 and all(r["sparsity"] == 0.5 for r in rows)


def test_bad_sparse_config_is_a_clear_error():
    for bad, msg in [("dynamic_sparsity.sparsity=1", "dynamic_sparsity.sparsity=1.0: must be in [0, 1)"),
                     ("dynamic_sparsity.sparsity=-0.1", "dynamic_sparsity.sparsity=-0.1"),
                     ("dynamic_sparsity.init=random", "dynamic_sparsity.init='random': must be snip, erk or uniform"),
                     ("dynamic_sparsity.prune_rate=1.5", "dynamic_sparsity.prune_rate=1.5"),
                     ("dynamic_sparsity.update_every=-1", "dynamic_sparsity.update_every=-1"),
                     ("dynamic_sparsity.include=[", "a valid regular expression")]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match="min_prune_rate <= dynamic_sparsity.prune_rate"):
        load_config(overrides=["dynamic_sparsity.prune_rate=0.1", "dynamic_sparsity.min_prune_rate=0.2"])
    cfg = load_config(overrides=["dynamic_sparsity.sparsity=0.5", "dynamic_sparsity.init=uniform"])
    with pytest.raises(ValueError, match="linprobe"):
        build_sparsity(cfg.dynamic_sparsity, _net(), 10, seed=0, task="linprobe", fsdp=False, world=1, fresh=True)
    with pytest.raises(ValueError, match="run.fsdp"):
        build_sparsity(cfg.dynamic_sparsity, _net(), 10, seed=0, task="finetune", fsdp=True, world=2, fresh=True)
    cfg.dynamic_sparsity.include = "LoRA"
    with pytest.raises(ValueError, match=r"matches no trainable conv/linear weight \(candidates: 0.weight"):
        build_sparsity(cfg.dynamic_sparsity, _net(), 10, seed=0, task="finetune", fsdp=False, world=1, fresh=True)
    assert build_sparsity(load_config().dynamic_sparsity, _net(), 10, seed=0, task="finetune", fsdp=False, world=1,
                          fresh=True) is None


# ---- DDP: every rank ends with rank 0's masks ---------------------------------------------------------------

def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _net()
    sp = DynamicSparsity(model, 0.6, init="snip", update_every=1, total_steps=100, distributed=True)
    sp.init_masks(_ce, _batch(seed=rank))  # each rank scores SNIP on its own batch
    with torch.no_grad():  # diverge the weights on purpose: magnitude pruning would pick differently
        for p in model.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(rank)))
    sp.update(0.5)
    torch.save({n: m.clone() for n, m in sp.masks.items()} | {"_counts": dict(sp.counts)}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch + maskconv (~5 s idle, 25 s on a busy 2-core box)
def test_ddp_ranks_hold_identical_masks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) if k == "_counts" else torch.equal(a[k], b[k]), k


def test_include_regex_and_tied_weights_select_each_tensor_once():
    net = _net()
    tied = nn.Sequential(net, nn.Linear(16, 4))
    tied[1].weight = net[6].weight  # shared with the head
    sp = DynamicSparsity(tied, 0.5, init="uniform")
    assert sp.names == ["0.0.weight", "0.2.weight", "0.3.weight", "0.6.weight"]
    sp.init_masks()
    assert torch.equal(tied[1].weight, net[6].weight) and int((net[6].weight != 0).sum()) == sp.counts["0.6.weight"]
    assert DynamicSparsity(_net(), 0.5, include=r"^[23]\.").names == ["2.weight", "3.weight"]


def test_first_batch_moves_detection_targets():
    """SNIP's first batch of a detection run: labels are a list of per-image target dicts (no ``.to``)."""
    from maskconv.engine.dist import DistInfo
    from maskconv.engine.sparsity import first_batch

    class Boxes(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 8, 8), float(i)), {"boxes": torch.tensor([[0.0, 0.0, i + 1.0, 2.0]]),
                                                     "labels": torch.tensor([1]), "image_id": i}

    images, labels = first_batch(2, 0, Boxes(), lambda x: x, None, DistInfo())
    assert images.shape == (2, 3, 8, 8) and isinstance(labels, list) and len(labels) == 2
    for img, t in zip(images, labels):  # each target still belongs to its image
        assert t["image_id"] == int(img[0, 0, 0]) and t["boxes"][0, 2] == t["image_id"] + 1
