"""The training DataLoader is built once per fit: its workers persist across epochs, and which process prepares a
sample changes nothing (same batches, losses and weights as loading in the main process), resume included."""
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

from maskconv.config import Config, DataCfg
from maskconv.data.build import build_transform
from maskconv.data.datasets import SyntheticImages
from tests.conftest import TinyProbe


class _PidLogged(Dataset):
    """A dataset that appends the pid of the process reading each item to a file (workers write there too)."""

    def __init__(self, ds: Dataset, path):
        self.ds, self.path, self.classes = ds, str(path), ds.classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.ds[i]



def _fit(out, workers: int, pids, stop_at=None):
    """3 epochs of 6 steps of a tiny probe on synthetic images (RandomResizedCrop + flip, seeded per sample).
    Returns (weights, [(epoch, indices, loss) per batch]); ``stop_at``: SIGINT in that loss call."""
    from maskconv.engine.loop import fit

    cfg = Config()
    cfg.data = DataCfg(path="synthetic", img_size=16, batch_size=4, num_workers=workers, crop_scale_min=0.3)
    cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup_epochs = 3, 1e-2, 0.5
    cfg.run.out, cfg.run.device, cfg.run.progress, cfg.run.seed, cfg.run.save_every_minutes = str(out), "cpu", False, 3, 0
    ds = _PidLogged(SyntheticImages(n=24, num_classes=4, size=20), pids)  # 6 batches an epoch
    torch.manual_seed(0)
    seen = []

    def loss_fn(m, x, y, keys):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        seen.append((keys[1], keys[0].tolist(), loss.item()))
        if stop_at is not None and len(seen) == stop_at:
            signal.raise_signal(signal.SIGINT)
        return loss

    res = fit(cfg, TinyProbe(4), ds, build_transform(cfg.data, 3, train=True), loss_fn, task="finetune", keyed_loss=True)
    res.run.release()
    return res.model.state_dict(), seen


def _readers(path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_persist_across_epochs_and_change_nothing(tmp_path):
    ref, ref_seen = _fit(tmp_path / "ref", 0, tmp_path / "pids0")
    got, seen = _fit(tmp_path / "w2", 2, tmp_path / "pids2")
    assert len(seen) == 18 and seen == ref_seen  # same batches, same epochs, same losses (exact floats)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert set(_readers(tmp_path / "pids0")) == {os.getpid()}
    readers = _readers(tmp_path / "pids2")
    assert len(readers) == 72  # every sample read once, all in workers
    # the same 2 worker processes served all 3 epochs (re-spawning per epoch would show 6 pids)
    assert len(set(readers)) == 2 and os.getpid() not in readers
    assert not any(_alive(p) for p in set(readers)), "the run's workers outlived fit()"


def test_resume_with_workers_is_exact(tmp_path):
    """Stopped mid second epoch, the resumed run's loader starts at that epoch's next batch, then its persistent
    workers serve the whole third epoch (the sampler's start_batch back to 0): the weights equal one run's."""
    from maskconv.engine.loop import Interrupted

    ref, ref_seen = _fit(tmp_path / "ref", 0, tmp_path / "pids0")
    with pytest.raises(Interrupted):
        _fit(tmp_path / "run", 2, tmp_path / "pids", stop_at=9)
    resumed, seen = _fit(tmp_path / "run", 2, tmp_path / "pids")
    assert seen == ref_seen[9:]  # the batches after the checkpoint, in order, none repeated or lost
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
