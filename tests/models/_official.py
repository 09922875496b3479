"""Independent re-statement of the official FB ConvNeXt V1/V2 (OFFICIAL.md §1.1, §2.1, §2.2), with the official
module names, so its ``state_dict`` is in the official layout. Test-only reference; written from the formulas,
NCHW + explicit permutes exactly as the official block."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNormCF(nn.Module):
    def __init__(self, c, eps=1e-6, channels_first=True):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps, self.cf, self.c = eps, channels_first, c

    def forward(self, x):
        if not self.cf:
            return F.layer_norm(x, (self.c,), self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class GRN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    def __init__(self, dim, v2):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNormCF(dim, channels_first=False)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if v2 else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = None if v2 else nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.act(self.pwconv1(self.norm(x)))
        if self.grn is not None:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        return inp + x.permute(0, 3, 1, 2)


class OfficialConvNeXt(nn.Module):
    def __init__(self, depths, dims, v2, num_classes=10, in_chans=3):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNormCF(dims[0]))]
            + [nn.Sequential(LayerNormCF(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList([nn.Sequential(*[Block(dims[i], v2) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        for ds, st in zip(self.downsample_layers, self.stages):
            x = st(ds(x))
        return self.norm(x.mean([-2, -1]))

    def forward(self, x):
        return self.head(self.forward_features(x))


def dense_to_minkowski(sd: dict) -> dict:
    """Official dense FCMAE-encoder state dict -> the MinkowskiEngine layout of ``SparseConvNeXtV2`` (OFFICIAL.md
    §2.3/§2.4), i.e. the inverse of the official ``remap_checkpoint_keys``: conv (O,I,k,k) -> kernel (k², I, O)
    with the spatial axes swapped; depthwise (C,1,k,k) -> (k², C); biases of ME convs (1,C); GRN (1,C); LN and
    Linear wrapped as ``.ln`` / ``.linear``; everything under ``encoder.``. Stem stays dense (nn.Conv2d + LN)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("head.", "norm.")):
            continue  # the sparse encoder has no head
        if k.startswith("downsample_layers.0."):
            out["encoder." + k] = v
            continue
        parts = k.split(".")
        if k.startswith("downsample_layers."):
            if parts[2] == "0":  # MinkowskiLayerNorm
                out[f"encoder.downsample_layers.{parts[1]}.0.ln.{parts[3]}"] = v
            elif parts[3] == "weight":  # MinkowskiConvolution kernel (kv, in, out)
                o, i, kh, kw = v.shape
                out[f"encoder.downsample_layers.{parts[1]}.1.kernel"] = v.transpose(3, 2).reshape(o, i, kh * kw).permute(2, 1, 0)
            else:
                out[f"encoder.downsample_layers.{parts[1]}.1.bias"] = v.reshape(1, -1)
            continue
        prefix, name, leaf = ".".join(parts[:3]), parts[3], parts[-1]
        if name == "dwconv":
            if leaf == "weight":
                c, _, kh, kw = v.shape
                out[f"encoder.{prefix}.dwconv.kernel"] = v.transpose(3, 2).reshape(c, kh * kw).permute(1, 0)
            else:
                out[f"encoder.{prefix}.dwconv.bias"] = v.reshape(1, -1)
        elif name == "norm":
            out[f"encoder.{prefix}.norm.ln.{leaf}"] = v
        elif name in ("pwconv1", "pwconv2"):
            out[f"encoder.{prefix}.{name}.linear.{leaf}"] = v
        elif name == "grn":
            out[f"encoder.{prefix}.grn.{leaf}"] = v.reshape(1, -1)
        else:
            raise KeyError(k)
    return out
