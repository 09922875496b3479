"""Large-kernel depthwise convolutions with structural re-parameterization (SLaK and RepLKNet).

Training-time form: several depthwise conv + BatchNorm branches summed. Deploy form (after ``reparameterize()``):
one depthwise M×M conv with bias, named ``lkb_reparam`` as in the official code. Sub-module names follow the
official repositories (VITA-Group/SLaK ``models/SLaK.py``, DingXiaoH/RepLKNet-pytorch ``replknet.py``):
``LoRA1`` / ``LoRA2`` / ``small_conv`` / ``lkb_origin``, each a ``conv`` + ``bn`` pair, so official checkpoints
map key for key.

The official SLaK code has merge code only for the non-decomposed path; the decomposed merge here pads the
M×N and N×M kernels centred to M×M and sums them with the padded N×N kernel (each branch is a linear map of
the same input with "same" padding, so the centred sum is exact; tested against the branches).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvBN", "DecomposedLargeKernelConv", "ReparamLargeKernelConv", "check_merge_state", "pad_kernel_to"]


def _pair(k) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


class ConvBN(nn.Sequential):
    """Conv2d without bias -> BatchNorm2d [-> ReLU] (official ``conv_bn`` / ``conv_bn_relu``: keys ``conv.*``,
    ``bn.*``; the ReLU is ``nonlinear`` and has no parameters).

    ``padding=None`` means "same" padding ``(k_h // 2, k_w // 2)``, as SLaK's implicit-GEMM conv applies it.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size, stride: int = 1, padding=None, groups: int = 1,
                 act: bool = False):
        super().__init__()
        kh, kw = _pair(kernel_size)
        if padding is None:
            padding = (kh // 2, kw // 2)
        self.conv = nn.Conv2d(in_chs, out_chs, (kh, kw), stride=stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        if act:
            self.nonlinear = nn.ReLU()

    def fuse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (kernel, bias) of one conv equal to conv -> BN in eval mode (BN running statistics folded in)."""
        bn = self.bn
        std = (bn.running_var + bn.eps).sqrt()
        scale = bn.weight / std  # (C_out,)
        kernel = self.conv.weight * scale.reshape(-1, 1, 1, 1)
        return kernel, bn.bias - bn.running_mean * scale


def pad_kernel_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (C_out, C_in/g, k_h, k_w) kernel centred to (size, size). Both the kernel and ``size`` are odd,
    so the centre tap stays at the centre and "same" padding keeps the output aligned."""
    kh, kw = kernel.shape[-2:]
    if kh > size or kw > size or (size - kh) % 2 or (size - kw) % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}: sizes must be odd and not larger")
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def _check_kernels(kernel_size: int, small_kernel: int | None) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size}: must be a positive odd number (same padding, centred merge)")
    if small_kernel is not None and (small_kernel < 1 or small_kernel % 2 == 0 or small_kernel > kernel_size):
        raise ValueError(
            f"small_kernel={small_kernel}: must be a positive odd number no larger than kernel_size={kernel_size}"
        )


class _Reparameterizable(nn.Module):
    """Shared deploy path: ``lkb_reparam`` (None until ``reparameterize()``) replaces the branches."""

    kernel_size: int
    _branch_names: tuple[str, ...]

    def branches(self) -> list[ConvBN]:
        return [getattr(self, n) for n in self._branch_names if getattr(self, n, None) is not None]

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel (C, 1, M, M), bias (C,)) of the single conv equal to the sum of the BN-folded branches."""
        kernel, bias = 0, 0
        for branch in self.branches():
            k, b = branch.fuse()
            kernel = kernel + pad_kernel_to(k, self.kernel_size)
            bias = bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the branches into one depthwise M×M conv with bias (``lkb_reparam``). Folds BatchNorm running
        statistics, so it is valid for inference only. Calling it twice is a no-op."""
        if self.lkb_reparam is not None:
            return
        ref = self.branches()[0].conv
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = nn.Conv2d(ref.in_channels, ref.out_channels, self.kernel_size, padding=self.kernel_size // 2,
                         groups=ref.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        for name in self._branch_names:
            if hasattr(self, name):
                delattr(self, name)
        self.lkb_reparam = conv

    def _forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        return self._forward_branches(x)


class DecomposedLargeKernelConv(_Reparameterizable):
    """SLaK's decomposed depthwise M×M kernel: ``LoRA1`` (M×N) + ``LoRA2`` (N×M) + ``small_conv`` (N×N, only when
    N < M), each conv (no bias) + BN, summed. Official class: ``ReparamLargeKernelConv(..., Decom=True)``."""

    _branch_names = ("LoRA1", "LoRA2", "small_conv")

    def __init__(self, dim: int, kernel_size: int = 51, small_kernel: int = 5):
        super().__init__()
        _check_kernels(kernel_size, small_kernel)
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.LoRA1 = ConvBN(dim, dim, (kernel_size, small_kernel), groups=dim)
        self.LoRA2 = ConvBN(dim, dim, (small_kernel, kernel_size), groups=dim)
        self.small_conv = ConvBN(dim, dim, small_kernel, groups=dim) if small_kernel < kernel_size else None
        self.lkb_reparam = None

    def _lora2(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return self.LoRA2(x)
        # Same result, computed as the M×N conv of the H/W-transposed map with the transposed kernel: on CPU,
        # oneDNN's channels-last backward for a wide N×M depthwise kernel is ~10× slower than for a tall M×N one
        # (bench/large_kernel.py). BN is per channel, so it commutes with the transpose.
        conv = self.LoRA2.conv
        xt = x.transpose(2, 3).contiguous(memory_format=torch.channels_last)  # (B, C, W, H)
        y = F.conv2d(xt, conv.weight.transpose(2, 3), None, conv.stride[::-1], conv.padding[::-1],
                     conv.dilation[::-1], conv.groups)
        return self.LoRA2.bn(y).transpose(2, 3)  # (B, C, H, W)

    def _forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.LoRA1(x) + self._lora2(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"


class ReparamLargeKernelConv(_Reparameterizable):
    """RepLKNet's depthwise M×M conv-BN (``lkb_origin``) + parallel N×N conv-BN (``small_conv``; none when
    ``small_kernel`` is None, as RepLKNet-XL), summed. SLaK's non-decomposed path (``Decom=False``) is this with
    ``small_kernel=None`` when N == M (SLaK adds its small conv only for N < M; RepLKNet always does)."""

    _branch_names = ("lkb_origin", "small_conv")

    def __init__(self, dim: int, kernel_size: int = 31, small_kernel: int | None = 5):
        super().__init__()
        _check_kernels(kernel_size, small_kernel)
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.lkb_origin = ConvBN(dim, dim, kernel_size, groups=dim)
        # the official code adds a small_conv even when small_kernel == kernel_size (mergeable, just redundant)
        self.small_conv = ConvBN(dim, dim, small_kernel, groups=dim) if small_kernel is not None else None
        self.lkb_reparam = None

    def _forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"


def check_merge_state(state_dict: dict, model: nn.Module) -> None:
    """Raise a ValueError when a checkpoint's large kernels are merged (``lkb_reparam``) and the model's are not,
    or the reverse: the keys could never match, and the strict loader's key list would not say why."""
    merged_ckpt = any(".lkb_reparam." in k for k in state_dict)
    merged_model = any(".lkb_reparam." in k for k in model.state_dict())
    if merged_ckpt and not merged_model:
        raise ValueError("the checkpoint's large kernels are merged (lkb_reparam): call "
                         "maskconv.export.reparameterize_model(model) before loading it (inference only)")
    if merged_model and not merged_ckpt:
        raise ValueError("the model's large kernels are merged (lkb_reparam) but the checkpoint's are branches: "
                         "load the checkpoint into a fresh model, then reparameterize it")
