"""Training-step memory at GPU batch sizes, computed without the memory: what the step keeps for the backward.

The forward runs under ``FakeTensorMode`` (shapes and dtypes, no storage, no compute) with a
``saved_tensors_hooks`` pack hook that adds up every distinct storage autograd saves for the backward, the bulk of a
step's peak. Static memory is 16 bytes per trainable parameter (fp32 weight, gradient and AdamW's two moments).
Not counted: the transient buffers of a single op or of the backward (workspace, the gradient of the
activation being processed), the allocator's rounding and the CUDA context: expect the measured peak
(``bench/gpu_smoke.py`` prints it) some 10-30% above. ``bf16`` uses PyTorch's CPU autocast rules (convs and
matmuls in bf16, norms and the loss in fp32), the same op lists as CUDA's for these models.

    python bench/step_memory.py [--batch 256 --size 224] [--cases fcmae:convnextv2_atto:gather,...]
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from unittest import mock

import torch

from maskconv.pretrain import create_objective
from maskconv.pretrain.masking import indexed_masks

DEFAULT = ",".join(f"fcmae:convnextv2_{m}:{p}" for m in ("atto", "tiny", "base") for p in ("gather", "dense")) + \
    ",mae:vit_base_patch16_224,convmae:convmae_base:gather,convmae:convmae_base:dense"


def saved_bytes(obj, batch: int, size: int, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    own = {t.untyped_storage()._cdata for t in [*obj.parameters(), *obj.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in own:
            seen[st._cdata] = st.nbytes()
        return t

    from torch._subclasses.fake_tensor import FakeTensorMode

    # the objectives' value checks (equal visible counts) read the mask, which a fake tensor does not have: take
    # the path torch.compile takes (shape checks only), as the engine's masks always pass the value checks
    with mock.patch("torch.compiler.is_compiling", return_value=True), FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(batch, obj.in_chans, size, size)
        h, w = obj.grid(x)
        mask = indexed_masks(torch.arange(batch), 0, 0, h, w, obj.mask_ratio)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            obj(x, mask=mask).loss
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cases", default=DEFAULT, help="objective:model[:sparse], comma-separated")
    a = ap.parse_args()
    gib = 2**30
    print(f"batch {a.batch}, {a.size} px, official mask ratios and decoders; GiB")
    print("| objective | model | path | params (M) | static (16 B/param) | saved fp32 | saved bf16 | total bf16 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for case in a.cases.split(","):
        ob, model, *rest = case.split(":")
        kw = {"sparse": rest[0]} if rest else {}
        torch.manual_seed(0)
        obj = create_objective(ob, model=model, **kw).train()
        n = sum(p.numel() for p in obj.parameters() if p.requires_grad)
        static = 16 * n
        fp32, bf16 = saved_bytes(obj, a.batch, a.size, False), saved_bytes(obj, a.batch, a.size, True)
        print(f"| {ob} | {model} | {rest[0] if rest else '-'} | {n / 1e6:.1f} | {static / gib:.2f} | "
              f"{fp32 / gib:.1f} | {bf16 / gib:.1f} | {(static + bf16) / gib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
