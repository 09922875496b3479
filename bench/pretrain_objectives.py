"""Pretraining step throughput of FCMAE, MAE and ConvMAE at matched model size, interleaved in one run.

A step = forward (masked encoder + decoder + loss) + backward + AdamW on one fixed batch, each objective with
its official mask ratio and decoder (FCMAE 0.6, 1 ConvNeXt V2 block; MAE / ConvMAE 0.75, 8 ViT blocks of 512).
Rounds alternate the order of the objectives; the median step time of each is reported with its ratio to MAE
(> 1: slower than MAE). Defaults: the ~85-89M "base" encoders at 224 px.

    .venv/bin/python bench/pretrain_objectives.py [--size 224 --batch 8 --rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskconv.pretrain import create_objective

# objective:model[:sparse] ("sparse" picks FCMAE's / ConvMAE's implementation; the default is the gathered one)
DEFAULT_CASES = ["mae:vit_base_patch16_224", "fcmae:convnextv2_base", "convmae:convmae_base",
                 "convmae:convmae_base:dense"]


def _step(obj, opt, x, mask):
    opt.zero_grad(set_to_none=True)
    obj(x, mask).loss.backward()
    opt.step()


def build(case: str):
    name, model, *rest = case.split(":")
    kw = {"sparse": rest[0]} if rest else {}
    obj = create_objective(name, model=model, **kw)
    enc_m = sum(p.numel() for p in obj.encoder.parameters()) / 1e6
    return obj, enc_m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="objective:model[:sparse]")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cases = args.cases  # an unknown objective or model fails in create_objective, naming the ones there are
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    runs = {}
    for c in cases:
        obj, enc_m = build(c)
        opt = torch.optim.AdamW([q for q in obj.parameters() if q.requires_grad], lr=1e-4)
        mask = obj.make_mask(x, torch.Generator().manual_seed(0))
        _step(obj, opt, x, mask)  # warm-up: AdamW state, oneDNN primitives
        runs[c] = dict(obj=obj, opt=opt, mask=mask, enc_m=enc_m, times=[],
                       total_m=sum(q.numel() for q in obj.parameters()) / 1e6)
    for r in range(args.rounds):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            d = runs[c]
            t0 = time.perf_counter()
            _step(d["obj"], d["opt"], x, d["mask"])
            d["times"].append(time.perf_counter() - t0)
    ref = next((c for c in cases if c.startswith("mae:")), cases[0])
    ref_t = statistics.median(runs[ref]["times"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.size} px, batch {args.batch}, "
          f"{args.rounds} interleaved rounds (median); ratio = step time / {ref}")
    print("| objective : model | mask | encoder params (M) | all params (M) | step ms | img/s | time vs MAE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        d = runs[c]
        t = statistics.median(d["times"])
        print(f"| {c} | {d['obj'].mask_ratio} | {d['enc_m']:.1f} | {d['total_m']:.1f} | {t * 1e3:.0f} | "
              f"{args.batch / t:.2f} | **{t / ref_t:.2f}×** |", flush=True)


if __name__ == "__main__":
    main()
