"""Distributed evaluation (each rank its share, counts summed: the one-process figures, DDP and FSDP alike),
EMA of FSDP shards (== AveragedModel), and run.keep_best (the best epoch's weights, kept across a resume)."""
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from maskconv.config import load_config
from maskconv.engine import dist as D

NUM_CLASSES, BATCH = 7, 3


@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_share_takes_every_item_once_in_order(n, world):
    shares = [D.eval_share(n, D.DistInfo(rank=r, world=world)) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # nothing padded, nothing dropped, one-process order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _folder(root):
    """13 files of 7 classes; class c3's 3 files are not images (unreadable): 10 images are scored. In file order
    they are items 6-8, so with batch 3 the second rank's first batch (items 6..8 of its 6..12) is all unreadable
    while the first rank has images, and the first rank (2 batches) ends a step before the second (3)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, count in enumerate([2, 2, 2, 3, 2, 1, 1]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(count):
            f = root / f"c{c}" / f"{i}.png"
            if c == 3:
                f.write_bytes(b"not an image")
            else:  # a colour per class, with noise
                base = torch.tensor([c * 36, 255 - c * 36, (c * 97) % 256])
                px = (base + torch.randint(-20, 20, (40, 40, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(f)


def _cfg(root):
    return load_config(overrides=["task=finetune", "model.name=test_convnextv2", f"data.path={root}",
                                  "data.img_size=32", "data.num_workers=0", "data.val_fraction=0",
                                  f"data.batch_size={BATCH}"])


def _model():
    """A small classifier whose predictions follow the images' colours (spread over several classes)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, NUM_CLASSES))


def _evaluate(root, info=None, model=None, lockstep=False):
    from maskconv.data.build import build_dataset
    from maskconv.tasks.classify import eval_loader, evaluate_classifier

    cfg = _cfg(root)
    ds = build_dataset(cfg.data, 3, "train", labeled=True)
    return evaluate_classifier(model or _model(), eval_loader(cfg, ds, info=info), NUM_CLASSES, torch.device("cpu"),
                               progress=False, info=info, lockstep=lockstep)


class _FakeDetector(nn.Module):
    """Two fixed boxes per image (a partial match of write_coco's objects): AP strictly between 0 and 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, images):
        box = torch.tensor([[2.0, 3.0, 14.0, 12.0], [12.0, 8.0, 25.0, 17.0]])
        return [{"boxes": box * self.w[0], "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.6])}
                for _ in images]


class _FakeSegmenter(nn.Module):
    """Class k predicted in the k-th vertical band of the input: a partial IoU."""

    def __init__(self, k):
        super().__init__()
        self.k, self.w = k, nn.Parameter(torch.ones(2))

    def forward(self, x):
        col = torch.linspace(0, self.k - 1, x.shape[-1])
        logits = -(col[None, :] - torch.arange(self.k)[:, None]).abs() * self.w[0]  # (K, W)
        return logits[None, :, None, :].expand(len(x), self.k, x.shape[-2], x.shape[-1])


def _coco(root):
    """write_coco's 3 images (split 1 + 2 over two ranks), box-shaped polygons for the segmentation maps."""
    from tests.data.test_coco import write_coco

    root = write_coco(root, size=(60, 45))
    raw = json.loads((root / "annotations.json").read_text())
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    (root / "annotations.json").write_text(json.dumps(raw))
    return root


def _dense(coco_root, info=None, fsdp=False):
    """Box AP of _FakeDetector and mIoU of _FakeSegmenter on the COCO folder (batch 1: uneven batch counts)."""
    from maskconv.data.coco import load_coco
    from maskconv.heads.task import SemanticMaps, evaluate_instances, evaluate_segmentation

    seg_data = SemanticMaps(coco_root)
    det, seg = _FakeDetector(), _FakeSegmenter(len(seg_data.classes))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(det)
        fully_shard(seg)
    box, _ = evaluate_instances(det, load_coco(coco_root), batch_size=1, device=torch.device("cpu"), info=info,
                                lockstep=fsdp)
    miou = evaluate_segmentation(seg, seg_data, 32, torch.device("cpu"), info=info, lockstep=fsdp)
    return box, miou


def _worker(rank, port, root, out):  # root: the image folder; its sibling coco/ the COCO folder
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.optim.swa_utils import AveragedModel

    from maskconv.engine.ema import ShardedEMA
    from maskconv.engine.loop import ema_warmup_fn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short collective timeout: a rank left waiting (a forward the other rank skipped under FSDP) fails the test
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        info = D.DistInfo(rank=rank, world=2)
        res = {"ddp": _evaluate(root, info)}  # the plain model on each rank (as the loop's unwrapped DDP model)
        model = _model()
        fully_shard(model[0])  # two units, as a model's fsdp_units() and root
        fully_shard(model)
        res["fsdp"] = _evaluate(root, info, model, lockstep=True)
        coco = os.path.join(os.path.dirname(root), "coco")
        res["dense_ddp"] = _dense(coco, info)
        res["dense_fsdp"] = _dense(coco, info, fsdp=True)

        # EMA of the shards vs AveragedModel of the whole model, through the same (sharded) weight changes
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
        whole = AveragedModel(net, multi_avg_fn=ema_warmup_fn(0.9, True), use_buffers=True)
        fully_shard(net[0])
        fully_shard(net)
        ema = ShardedEMA(net, ema_warmup_fn(0.9, True))
        ref = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
        ref.load_state_dict(whole.module.state_dict())  # the same start, unsharded
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
        for step in range(4):
            g = torch.Generator().manual_seed(10 + step)
            deltas = [torch.randn(p.shape, generator=g) for p in ref.parameters()]
            with torch.no_grad():
                for p, d in zip(ref.parameters(), deltas):
                    p.add_(d)
                for p, d in zip(net.parameters(), deltas):  # this rank's rows of the same change (FSDP2: Shard(0),
                    p.to_local().add_(torch.chunk(d, 2)[rank])  # torch.chunk's split)
            whole.update_parameters(ref)
            ema.update_parameters(net)
        sd = ema.state_dict()  # collective
        with torch.no_grad():
            own = net(x).detach()
            with ema.applied() as m:
                ema_out = m(x).detach()
            after = net(x).detach()
        res["ema"] = dict(state=sd, ref=whole.state_dict(), ema_out=ema_out, ref_out=whole.module(x).detach(),
                          own=own, after=after, ref_own=ref(x).detach())
        torch.save(res, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("out")
    _folder(root / "images")
    _coco(root / "coco")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(root / "images"), str(out)), nprocs=2, join=True)
    return root / "images", [torch.load(out / f"{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow  # two spawned processes each import torch + maskconv (~10 s idle, longer on a busy 2-core box)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_eval_equals_one_process(two_ranks, mode):
    root, ranks = two_ranks
    one = _evaluate(root)
    assert one["val_images"] == 10 and len(one["val_unreadable"]) == 3
    assert sum(1 for col in zip(*one["val_confusion"]) if sum(col)) >= 2  # the comparison means something
    for r in ranks:
        two = r[mode]
        assert two["val_confusion"] == one["val_confusion"]  # exact: integer counts summed over the ranks
        assert two["val_images"] == 10  # the uneven split neither padded (11, 12) nor dropped an image
        assert two["val_top1"] == one["val_top1"] and two["val_top5"] == one["val_top5"]
        assert two["val_per_class"] == one["val_per_class"]
        assert two["val_unreadable"] == one["val_unreadable"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense_ddp", "dense_fsdp"])
def test_two_process_detection_and_segmentation_eval_equal_one_process(two_ranks, mode):
    root, ranks = two_ranks
    box, miou = _dense(root.parent / "coco")
    assert 0 < box["AP50"] < 1 and 0 < miou["mIoU"] < 1  # partial scores: the comparison means something
    assert ranks[0][mode][0] == box  # detections gathered to rank 0, scored there
    assert ranks[1][mode][0] == {}  # ... and only there
    for r in ranks:
        assert r[mode][1] == miou  # pixel confusions summed on every rank


@pytest.mark.slow
def test_ema_of_fsdp_shards_equals_averaged_model(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        e = r["ema"]
        if r is ranks[0]:  # the gathered state: AveragedModel's layout and values
            assert e["state"].keys() == e["ref"].keys()
            for k in e["ref"]:
                torch.testing.assert_close(e["state"][k], e["ref"][k], msg=k)
        torch.testing.assert_close(e["ema_out"], e["ref_out"])  # the sharded model ran with the EMA weights
        torch.testing.assert_close(e["own"], e["ref_own"])
        torch.testing.assert_close(e["after"], e["own"])  # ... and has its own weights back after
        assert not torch.allclose(e["ema_out"], e["own"])


# ---- run.keep_best ---------------------------------------------------------------------------------------

class _Crash(Exception):
    pass


def _fit(out, values, extra=()):
    """A 3-epoch finetune whose evaluation returns ``values`` in turn (an exception instance is raised)."""
    from maskconv import create_model
    from maskconv.data.build import build_dataset, build_transform
    from maskconv.engine.loop import fit

    cfg = load_config(overrides=["task=finetune", "model.name=test_convnextv2", "data.path=synthetic",
                                 "data.img_size=32", "data.batch_size=16", "data.num_workers=0", "run.progress=false",
                                 "optim.epochs=3", "optim.blr=1e-2", f"run.out={out}", "run.keep_best=val_acc",
                                 *extra])
    torch.manual_seed(0)
    model = create_model("test_convnextv2", num_classes=4)
    values = list(values)

    def evaluate(m):
        v = values.pop(0)
        if isinstance(v, Exception):
            raise v
        return {"val_acc": v}

    res = fit(cfg, model, build_dataset(cfg.data, 3, "train"), build_transform(cfg.data, 3, train=True),
              lambda m, x, y: F.cross_entropy(m(x), y), task="finetune", evaluate=evaluate)
    res.run.release()
    return res


def test_keep_best_writes_the_best_epoch_and_a_resume_keeps_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(_Crash):  # epochs 1 and 2 evaluated and checkpointed; the 3rd evaluation crashes
        _fit(out, [1.0, 3.0, _Crash()])
    best = json.loads((out / "best.json").read_text())
    assert (best["epoch"], best["value"], best["mode"], best["weights"]) == (2, 3.0, "max", "raw")
    at_2 = torch.load(out / "last.pt", weights_only=True)["model"]  # the weights of epoch 2
    w = load_file(out / "best.safetensors")
    assert w.keys() == at_2.keys() and all(torch.equal(w[k], at_2[k]) for k in w)
    # resumed: epoch 3 is worse than the best so far (kept in the checkpoint) -> best.* stay epoch 2's
    res = _fit(out, [2.0])
    assert res.state.epoch == 3 and res.state.best["epoch"] == 2
    assert json.loads((out / "best.json").read_text()) == best
    w = load_file(out / "best.safetensors")
    assert all(torch.equal(w[k], at_2[k]) for k in w)
    final = torch.load(out / "last.pt", weights_only=True)["model"]
    assert not all(torch.equal(final[k], at_2[k]) for k in final)  # the kept weights are not the last ones


def test_keep_best_min_mode_nan_and_unknown_metric(tmp_path):
    _fit(tmp_path / "min", [2.0, float("nan"), 1.0], ["run.keep_best_mode=min"])
    best = json.loads((tmp_path / "min" / "best.json").read_text())
    assert (best["epoch"], best["value"], best["mode"]) == (3, 1.0, "min")  # the NaN epoch was never a best
    with pytest.raises(ValueError, match=r"run.keep_best='val_top1' is not a metric of this run; it logs: "
                                         r"train_loss, val_acc"):
        _fit(tmp_path / "unknown", [1.0], ["run.keep_best=val_top1"])
    # the epoch was logged and saved before the error: a resume with the right name loses nothing
    assert torch.load(tmp_path / "unknown" / "last.pt", weights_only=True)["state"]["epoch"] == 1
    with pytest.raises(ValueError, match="names an EMA metric, but the run keeps no EMA"):
        _fit(tmp_path / "ema", [1.0], ["run.keep_best=ema_val_acc"])
    assert not (tmp_path / "ema").exists()  # refused before any work


def test_keep_best_compares_with_a_best_on_disk_newer_than_the_checkpoint(tmp_path):
    """best.json written at an epoch whose checkpoint was not (a crash between the two writes, or
    run.save_every_epochs > 1): the resumed run does not replace that better best by a worse one."""
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        _fit(out, [1.0, _Crash()])
    rec = json.loads((out / "best.json").read_text())
    (out / "best.json").write_text(json.dumps({**rec, "value": 5.0, "epoch": 2}))  # as if epoch 2 had scored 5
    _fit(out, [4.0, 4.5])  # epochs 2 and 3 again: both worse than the 5.0 on disk
    assert json.loads((out / "best.json").read_text())["value"] == 5.0


def test_eval_reads_which_weights_best_safetensors_kept(tmp_path):
    """``maskconv eval --checkpoint RUN/best.safetensors`` names EMA weights EMA (from the file's keep_best record,
    not its name) and the trained weights raw."""
    from maskconv import create_model
    from maskconv.models import save_weights
    from maskconv.tasks.classify import load_eval_source

    sd = create_model("test_convnextv2", num_classes=4).state_dict()
    meta = {"architecture": "test_convnextv2", "num_classes": "4", "classes": json.dumps(list("abcd"))}
    for kind in ("ema", "raw"):
        f = tmp_path / kind / "best.safetensors"
        f.parent.mkdir()
        save_weights(sd, f, metadata={**meta, "keep_best": json.dumps({"metric": "x", "weights": kind})})
        assert list(load_eval_source(f).weights) == [kind]
