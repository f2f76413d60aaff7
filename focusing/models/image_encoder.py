"""Image encoders for the condition of the flow models: RGB `[B, 3, H, W]` in [0, 1] -> tokens `[B, T, D]`.

    encoder = build_image_encoder(ImageEncoderConfig())            # "conv": small, trained with the flow model
    tokens = encoder(images)                                        # [B, (S / patch)^2, channels]

- "conv" (default): a conv stem (stride-2 convs down to `patch_size`) and `blocks` pre-norm ViT blocks with a
  learned position embedding; trained jointly with the flow model from scratch, so the pipeline needs no
  external weights.
- "dinov2": a DINOv2-architecture ViT whose weights the user gives as a local folder in Hugging Face's format
  (config.json + model.safetensors; `weights`), run through `transformers` (the optional extra
  `pip install 'focusing[dinov2]'`, imported only here). Frozen; its tokens are TRELLIS's: the last hidden
  state (CLS + patch tokens) layer-normed without affine. Its weights stay out of the flow model's state dict
  (they are the user's file, named in the config), so checkpoints hold only what was trained.

Both take images normalised with the ImageNet mean / std inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from focusing.errors import FocusingError, InputError

KINDS = ("conv", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageEncoderConfig:
    kind: str = "conv"  # "conv" (trained jointly) or "dinov2" (frozen, weights from the local folder `weights`)
    image_size: int = 256  # condition images are resized to this square (DINOv2: 518, patch 14 -> 37^2 tokens)
    channels: int = 256  # token width of "conv"
    patch_size: int = 16  # "conv": a power of two >= 2 (the stem's total stride)
    blocks: int = 4  # "conv": ViT blocks after the stem
    heads: int = 4
    weights: str = ""  # "dinov2": folder with config.json + model.safetensors (transformers' format)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"image encoder kind must be one of {KINDS}, got {self.kind!r}")
        p = self.patch_size
        if self.kind == "conv" and (p < 2 or p & (p - 1) or self.image_size % p or self.channels % self.heads):
            raise ValueError(f"conv image encoder needs a power-of-two patch_size >= 2 dividing image_size and "
                             f"channels divisible by heads, got {p}, {self.image_size}, {self.channels}, {self.heads}")


class _Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class ConvViTEncoder(nn.Module):
    """The "conv" encoder: `[B, 3, S, S]` -> `[B, (S / patch)^2, channels]` (see the module docstring)."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        c = config
        self.normalize = _Normalize()
        n_down = c.patch_size.bit_length() - 1
        widths = [max(c.channels >> (n_down - 1 - i), 16) for i in range(n_down)]
        layers, prev = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, stride=2, padding=1)]
            if i + 1 < n_down:
                layers += [nn.GroupNorm(8 if w % 8 == 0 else 1, w), nn.SiLU()]
            prev = w
        self.stem = nn.Sequential(*layers, nn.Conv2d(prev, c.channels, 1))
        tokens = (c.image_size // c.patch_size) ** 2
        self.pos = nn.Parameter(torch.randn(1, tokens, c.channels) * 0.02)
        layer = nn.TransformerEncoderLayer(c.channels, c.heads, 4 * c.channels, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.channels)
        self.out_channels = c.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.normalize(images)).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(h + self.pos))


class DINOv2Encoder(nn.Module):
    """The "dinov2" encoder: frozen `transformers.Dinov2Model` from a local folder -> `[B, 1 + P, hidden]`."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        transformers = _import_transformers()
        folder = Path(config.weights).expanduser() if config.weights else None
        if folder is None:
            raise FocusingError("image encoder 'dinov2' needs model.image.weights: a local folder with config.json "
                                "and model.safetensors (nothing is downloaded)")
        if folder.is_file():
            folder = folder.parent
        if not (folder / "config.json").is_file():
            raise InputError(folder, "not a DINOv2 weights folder (expected config.json + model.safetensors)")
        try:
            model = transformers.Dinov2Model.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(folder, f"cannot load DINOv2 weights ({' '.join(str(exc).split())[:200]})") from None
        model.requires_grad_(False).eval()
        self._frozen = [model]  # a plain list: not a submodule, so not in state_dict() or parameters()
        self.normalize = _Normalize()
        self.out_channels = int(model.config.hidden_size)

    def _apply(self, fn, recurse=True):  # .to(device / dtype) moves the frozen model too
        self._frozen[0]._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self._frozen[0].eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self._frozen[0](pixel_values=self.normalize(images)).last_hidden_state
        return F.layer_norm(hidden.float(), hidden.shape[-1:])


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise FocusingError("image encoder 'dinov2' needs the optional package transformers, which is not "
                            "installed: pip install 'focusing[dinov2]'") from None
    return transformers


def build_image_encoder(config: ImageEncoderConfig) -> nn.Module:
    """The encoder `config.kind` names; it has `out_channels` (the token width D)."""
    return ConvViTEncoder(config) if config.kind == "conv" else DINOv2Encoder(config)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[B, 3, H, W]` -> `[B, 3, size, size]` (bilinear with antialiasing; unchanged when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
