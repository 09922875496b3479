"""Dynamic sparse training as in SLaK (VITA-Group/SLaK ``sparse_core.py``), for any model the engine trains.

``DynamicSparsity`` owns one boolean mask per chosen weight (True = active). The chosen weights are the
``weight`` of every ``nn.Linear`` / ``nn.Conv*`` (SLaK: every 2-D/4-D weight, stem, downsample and head
included), optionally only those whose name matches a regex (e.g. ``large_kernel`` branches only).

- Layer-wise density at init: ``uniform``, ``erk`` (Erdos-Renyi-Kernel, RigL) or ``snip`` (official: score
  |w * dL/dw| on one batch on a copy, a global top-k gives each layer's density, then a *random* mask of
  that density). Per-layer counts are integers that add up to exactly ``round((1 - sparsity) * N)``.
- Every ``update_every`` optimizer steps: per layer, prune the ceil(rate * nnz) smallest-|w| active weights and
  regrow exactly as many positions chosen at random among the previously inactive ones (starting at 0), so each
  layer's density and the global sparsity never change. The rate decays by cosine to ``min_prune_rate``.
- After every optimizer step the weights *and* their optimizer state (momenta) are multiplied by the mask,
  under AMP too (the official code skipped masking with ``--use_amp``).

Differences from the official code, on purpose: exact counts instead of Bernoulli draws (the official random
growth regrows "about" as many as it pruned); regrowth never re-picks a weight pruned in the same update;
ERK/SNIP layers that come out fully dense are simply left unmasked (the official drops density >= 0.99).

In the engine: ``dynamic_sparsity.sparsity=0.4`` (config section ``dynamic_sparsity``). In your own loop::

    sp = DynamicSparsity(model, 0.4, init="erk", update_every=100, total_steps=n_steps)
    sp.init_masks()                        # snip: sp.init_masks(loss_fn, (images, labels))
    for step in range(1, n_steps + 1):
        loss_fn(model, images, labels).backward(); opt.step(); opt.zero_grad()
        sp.step(opt, step)                 # then, with an EMA: ema.update_parameters(model); sp.mask_ema(ema.module)
"""
from __future__ import annotations

import copy
import math
import re
from typing import Callable

import torch
import torch.nn as nn

from ..config import SparsityInit, literal_words
from .schedule import cosine

INITS = literal_words(SparsityInit)


def sparse_weight_names(model: nn.Module, include: str = "") -> list[str]:
    """Names of the trainable conv / linear weights that ``include`` (``re.search``; "" = all) matches."""
    try:
        pattern = re.compile(include) if include else None
    except re.error as e:
        raise ValueError(f"dynamic_sparsity.include={include!r} is not a valid regular expression: {e}") from None
    names, candidates, seen = [], [], set()
    for mname, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or mod.weight is None:
            continue
        if not mod.weight.requires_grad or id(mod.weight) in seen:  # a tied weight gets one mask
            continue
        seen.add(id(mod.weight))
        name = f"{mname}.weight" if mname else "weight"
        candidates.append(name)
        if pattern is None or pattern.search(name):
            names.append(name)
    if not names:
        shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
        raise ValueError(f"dynamic_sparsity.include={include!r} matches no trainable conv/linear weight "
                         f"(candidates: {shown or 'none'})")
    return names


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel: density_l proportional to sum(shape_l) / prod(shape_l), with the layers whose
    density would exceed 1 made dense (RigL / SLaK ``sparse_init='ERK'``); sum(density_l * n_l) = density * N."""
    dense: set[str] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                raw[name] = sum(shape) / n
                divisor += raw[name] * n
        if not raw:  # every layer dense (density ~ 1)
            return {name: 1.0 for name in shapes}
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps <= 1:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense |= {name for name, r in raw.items() if r == top}


def allocate_counts(densities: dict[str, float], sizes: dict[str, int], total: int) -> dict[str, int]:
    """Integer active counts near ``density * size`` per layer that add up to exactly ``total`` (largest
    remainder first, capped at each layer's size)."""
    want = {k: min(max(densities[k], 0.0), 1.0) * sizes[k] for k in sizes}
    counts = {k: min(int(math.floor(v)), sizes[k]) for k, v in want.items()}
    left = total - sum(counts.values())
    order = sorted(sizes, key=lambda k: (-(want[k] - counts[k]), k))  # name breaks ties: deterministic
    while left > 0:
        progressed = False
        for k in order:
            if left == 0:
                break
            if counts[k] < sizes[k]:
                counts[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total} active weights in {sum(sizes.values())} positions")
    while left < 0:  # floors never overshoot; kept for safety against float densities > target
        for k in reversed(order):
            if left == 0:
                break
            if counts[k] > 0:
                counts[k] -= 1
                left += 1
    return counts


class DynamicSparsity:
    """Masks, init, prune/regrow schedule and EMA rule for the chosen weights of ``model`` (see module doc).

    Call ``init_masks`` once (fresh run) or ``load_state_dict`` (resume), then ``step(optimizer, step)`` right
    after every optimizer step and ``mask_ema(ema_model)`` right after every EMA update.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, init: str = "snip", prune_rate: float = 0.3,
                 min_prune_rate: float = 0.005, update_every: int = 100, total_steps: int = 1, include: str = "",
                 seed: int = 0, distributed: bool = False):
        if not 0 < sparsity < 1:
            raise ValueError(f"dynamic_sparsity.sparsity={sparsity}: must be in (0, 1) to train sparsely")
        if init not in INITS:
            raise ValueError(f"dynamic_sparsity.init={init!r}: use {', '.join(INITS)}")
        if not 0 <= min_prune_rate <= prune_rate <= 1:
            raise ValueError(f"dynamic_sparsity.prune_rate={prune_rate}, dynamic_sparsity.min_prune_rate={min_prune_rate}: need "
                             "0 <= min_prune_rate <= prune_rate <= 1")
        if update_every < 0 or total_steps < 1:
            raise ValueError(f"dynamic_sparsity.update_every={update_every} (>= 0) / total_steps={total_steps} (>= 1)")
        for p in model.parameters():
            if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
                raise ValueError("sparse training does not support FSDP-sharded parameters (run.fsdp): "
                                 "use DDP (the default under torchrun)")
        self.model, self.sparsity, self.init = model, float(sparsity), init
        self.prune_rate, self.min_prune_rate, self.update_every = prune_rate, min_prune_rate, update_every
        self.total_steps, self.distributed = total_steps, distributed
        params = dict(model.named_parameters())
        self.names = sparse_weight_names(model, include)
        self.params = {n: params[n] for n in self.names}
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.counts: dict[str, int] = {}  # active weights per chosen layer (dense ones too)
        self.masks: dict[str, torch.Tensor] = {}  # bool, param's shape and device; only layers not fully dense
        self.generator = torch.Generator().manual_seed(seed)  # same seed on every rank: same masks
        self._grown: dict[str, torch.Tensor] = {}  # positions regrown by the last update, for the EMA

    # ---- init -------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def target_active(self) -> int:
        return round((1 - self.sparsity) * self.total)

    @torch.no_grad()
    def init_masks(self, loss_fn: Callable | None = None, batch: Callable | tuple | None = None) -> None:
        """Draw the masks. ``snip`` needs ``loss_fn(model, images, labels) -> loss`` and ``batch``
        ((images, labels) or a callable returning them); the model itself is not touched by the scoring."""
        k = self.target_active()
        if self.init == "snip":
            if loss_fn is None or batch is None:
                raise ValueError("dynamic_sparsity.init=snip needs a loss function and one training batch")
            counts = self._snip_counts(loss_fn, batch() if callable(batch) else batch, k)
        else:
            dens = {n: 1 - self.sparsity for n in self.names} if self.init == "uniform" else \
                erk_densities({n: tuple(p.shape) for n, p in self.params.items()}, 1 - self.sparsity)
            counts = allocate_counts(dens, self.sizes, k)
        self.counts = counts
        self.masks = {}
        for n in self.names:
            if counts[n] < self.sizes[n]:
                idx = torch.randperm(self.sizes[n], generator=self.generator)[:counts[n]]
                m = torch.zeros(self.sizes[n], dtype=torch.bool)
                m[idx] = True
                self.masks[n] = m.view(self.params[n].shape).to(self.params[n].device)
        self._broadcast()
        self.apply()

    def _snip_counts(self, loss_fn: Callable, batch: tuple, k: int) -> dict[str, int]:
        """Per-layer number of the global top-k |w * grad| scores (SLaK SNIP), on a copy of the model."""
        images, labels = batch[0], batch[1]
        net = copy.deepcopy(self.model)
        net.zero_grad(set_to_none=True)
        dev = images.device
        with torch.enable_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            loss_fn(net, images, labels).backward()  # forked RNG: masking / drop path leave the run's RNG alone
        params = dict(net.named_parameters())
        scores = [(params[n].detach() * params[n].grad).abs().flatten() if params[n].grad is not None
                  else torch.zeros(self.sizes[n], device=params[n].device) for n in self.names]
        flat = torch.cat(scores).float()
        top = torch.topk(flat, k, sorted=False).indices  # exactly k winners, ties included
        ends = torch.tensor([self.sizes[n] for n in self.names], device=flat.device).cumsum(0)
        layer = torch.searchsorted(ends, top, right=True)  # which layer each winner lies in
        per = torch.bincount(layer, minlength=len(self.names)).tolist()
        del net, flat, top, layer
        return self._agree(dict(zip(self.names, per)))

    def _agree(self, counts: dict[str, int]) -> dict[str, int]:
        """Under DDP take rank 0's counts (each rank scored SNIP on its own batch)."""
        if not self._world_gt1():
            return counts
        import torch.distributed as dist

        box = [counts]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _world_gt1(self) -> bool:
        import torch.distributed as dist

        return self.distributed and dist.is_initialized() and dist.get_world_size() > 1

    # ---- training-time ----------------------------------------------------------------------------------
    def prune_rate_at(self, step: int) -> float:
        """Cosine decay from ``prune_rate`` to ``min_prune_rate`` over the run (official CosineAnnealingLR)."""
        t = min(max(step, 0), self.total_steps) / self.total_steps
        return cosine(t, self.prune_rate, self.min_prune_rate)

    def step(self, optimizer: torch.optim.Optimizer | None, step: int) -> bool:
        """After an optimizer step (``step`` = optimizer steps taken): mask weights and optimizer state, and
        prune/regrow when ``step`` is a multiple of ``update_every`` (not at the very last step). True if
        the masks changed."""
        self.apply(optimizer)
        if self.update_every and step % self.update_every == 0 and step < self.total_steps:
            self.update(self.prune_rate_at(step), optimizer)
            return True
        return False

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the inactive weights and, so that momentum cannot revive them, their optimizer state."""
        for n, m in self.masks.items():
            p = self.params[n]
            p.mul_(m)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(m)

    @torch.no_grad()
    def update(self, rate: float, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Magnitude prune + random regrowth of exactly as many previously inactive positions, per layer.
        Returns the number of weights moved per layer."""
        moved, self._grown = {}, {}
        for n, m in self.masks.items():
            p, nnz, size = self.params[n], self.counts[n], self.sizes[n]
            k = min(math.ceil(round(rate * nnz, 9)), size - nnz)  # round(): 0.3 * 10 must give 3, not 4
            if k <= 0:
                continue
            flat = m.flatten()
            score = p.detach().abs().flatten().float().masked_fill(~flat, float("inf"))
            pruned = torch.argsort(score, stable=True)[:k]  # the k smallest |w| among active weights
            inactive = (~flat).nonzero().squeeze(1)  # before pruning: never regrow what was just pruned
            pick = torch.randperm(inactive.numel(), generator=self.generator)[:k].to(inactive.device)
            grown = inactive[pick]
            new = flat.clone()
            new[pruned] = False
            new[grown] = True
            m.copy_(new.view_as(m))
            g = torch.zeros_like(flat)
            g[grown] = True
            self._grown[n] = g.view_as(m)
            p.masked_fill_(self._grown[n], 0)  # regrown weights start at zero (they are already, if masks held)
            moved[n] = k
        self._broadcast()
        self.apply(optimizer)
        return moved

    @torch.no_grad()
    def mask_ema(self, ema_model: nn.Module) -> None:
        """SLaK ``model_sema``: EMA weights masked; positions regrown by the last update copied from the model."""
        params = dict(ema_model.named_parameters())
        for n, m in self.masks.items():
            e = params[n]
            g = self._grown.get(n)
            if g is not None:
                e[g] = self.params[n].detach()[g].to(e.dtype)
            e.mul_(m)
        self._grown = {}

    def _broadcast(self) -> None:
        """Under DDP every rank holds rank 0's masks (they should agree already; this makes it certain)."""
        if not self._world_gt1():
            return
        import torch.distributed as dist

        for m in self.masks.values():
            t = m.to(torch.uint8)
            dist.broadcast(t, src=0)
            m.copy_(t.bool())

    # ---- reporting / checkpoints ------------------------------------------------------------------------
    @property
    def global_sparsity(self) -> float:
        """Fraction of the chosen weights that are masked out."""
        return 1 - sum(self.counts.values()) / self.total

    def layer_density(self) -> dict[str, float]:
        return {n: self.counts[n] / self.sizes[n] for n in self.names}

    def state_dict(self) -> dict:
        return {"sparsity": self.sparsity, "init": self.init, "names": list(self.names),
                "counts": [self.counts[n] for n in self.names],
                "masks": {n: m.cpu() for n, m in self.masks.items()}, "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["names"] != self.names:
            raise ValueError(f"the checkpoint's sparse weights ({len(sd['names'])}) differ from this run's "
                             f"({len(self.names)}): dynamic_sparsity.include or the model changed since it was written")
        if abs(sd["sparsity"] - self.sparsity) > 1e-12:
            raise ValueError(f"the checkpoint was trained at dynamic_sparsity.sparsity={sd['sparsity']}, this run asks for "
                             f"{self.sparsity}: choose another run.out")
        self.counts = dict(zip(self.names, (int(c) for c in sd["counts"])))
        self.masks = {}
        for n, m in sd["masks"].items():
            if m.shape != self.params[n].shape or int(m.sum()) != self.counts[n]:
                raise ValueError(f"checkpoint mask {n} does not fit {tuple(self.params[n].shape)} with "
                                 f"{self.counts[n]} active weights")
            self.masks[n] = m.to(device=self.params[n].device, dtype=torch.bool)
        self.generator.set_state(sd["generator"])
        self.apply()


def build_sparsity(s, model: nn.Module, total_steps: int, *, seed: int, task: str, fsdp: bool, world: int,
                   fresh: bool, loss_fn: Callable | None = None, batch: Callable | None = None):
    """The run's ``DynamicSparsity`` from its ``dynamic_sparsity`` config section ``s`` (None when ``s.sparsity`` is 0).
    ``fresh``: draw the masks now (a resumed run loads them from its checkpoint instead)."""
    if s.sparsity == 0:
        return None
    if task == "linprobe":
        raise ValueError("dynamic_sparsity.sparsity > 0 with linprobe: the probe trains only its head; sparse-train the "
                         "backbone in pretrain or finetune instead")
    if fsdp:
        raise ValueError("dynamic_sparsity.sparsity > 0 is not supported with run.fsdp (masks of sharded weights); "
                         "use DDP (run.fsdp=false)")
    sp = DynamicSparsity(model, s.sparsity, init=s.init, prune_rate=s.prune_rate, min_prune_rate=s.min_prune_rate,
                         update_every=s.update_every, total_steps=total_steps, include=s.include, seed=seed,
                         distributed=world > 1)
    if fresh:
        sp.init_masks(loss_fn, batch)
    return sp


def first_batch(batch_size: int, seed: int, dataset, transform, batch_transform, info
                ) -> tuple[torch.Tensor, torch.Tensor | list[dict]]:
    """This process's first training batch of epoch 0 (what SNIP scores), on the run's device; labels a tensor,
    or detection targets (a list of dicts). For a stream: the first batch of epoch 0 as one reader per process
    would cut it (with DataLoader workers the run's own first batch may hold other samples)."""
    from torch.utils.data import DataLoader

    from ..data.datasets import ResumableSampler, SeededDataset, collate_skip
    from .dist import to_device

    if hasattr(dataset, "epoch_iterable"):  # a stream (data/stream.py): its first batch of epoch 0
        items = dataset.epoch_iterable(transform, seed, 0, info.rank, info.world, batch_size, num_batches=1)
        loader = DataLoader(items, batch_size=batch_size, collate_fn=lambda b: collate_skip([s for s, _ in b]))
    else:
        sampler = ResumableSampler(len(dataset), batch_size, seed, 0, info.rank, info.world, max_batches=1)
        loader = DataLoader(SeededDataset(dataset, transform, seed), batch_size=batch_size,
                            sampler=sampler, num_workers=0, collate_fn=collate_skip)
    with torch.random.fork_rng(devices=[]):  # augmentation reseeds the global RNG: keep the run's own
        images, labels, _ = next(iter(loader))
        images, labels = images.to(info.device), to_device(labels, info.device)
        if batch_transform is not None:
            images, labels = batch_transform(images, labels)
    return images, labels
