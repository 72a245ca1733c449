"""Host-side image augmentation on PIL images, every random choice drawn from a numpy Generator the caller seeds.

Random-resized-crop follows the Inception recipe (Szegedy et al., arXiv:1409.4842, sec. 6: area fraction and aspect
ratio sampled, ten tries, then a centre crop); RandAugment follows Cubuk et al., arXiv:1909.13719 (N ops drawn
uniformly, one shared magnitude M on a 0..10 scale, each op applied with probability 0.5 as in the TF implementation);
mixup (Zhang et al., arXiv:1710.09412) and CutMix (Yun et al., arXiv:1905.04899) mix whole batches with soft labels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def rrc_box(w: int, h: int, rng: np.random.Generator, scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The crop window (left, top, right, bottom) of random-resized-crop in a `w` x `h` image."""
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            break
    else:  # fall back to the largest centred crop within the ratio range
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def random_resized_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), resample=Image.Resampling.BICUBIC) -> Image.Image:
    """A crop of random area fraction in `scale` and aspect ratio in `ratio`, resized to `size` (H, W)."""
    return img.resize((size[1], size[0]), resample, box=rrc_box(*img.size, rng, scale, ratio))


# ---- RandAugment -------------------------------------------------------------------------------------------------

def _signed(level: float, maximum: float, rng: np.random.Generator) -> float:
    v = level / MAX_LEVEL * maximum
    return -v if rng.random() < 0.5 else v


def _enhance(enhancer):
    # factor in [0.1, 1.9]: 1 is the identity, as in the TF RandAugment "Color/Contrast/Brightness/Sharpness" ops
    return lambda img, level, rng: enhancer(img).enhance(1.0 + _signed(level, 0.9, rng))


def _affine(img: Image.Image, matrix) -> Image.Image:
    fill = _FILL if img.mode == "RGB" else 128
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _rotate(img, level, rng):
    fill = _FILL if img.mode == "RGB" else 128
    return img.rotate(_signed(level, 30.0, rng), resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _solarize_add(img, level, rng):
    add = int(level / MAX_LEVEL * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


RANDAUGMENT_OPS = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Rotate": _rotate,
    "Solarize": lambda img, level, rng: ImageOps.solarize(img, 256 - int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": _solarize_add,
    "Posterize": lambda img, level, rng: ImageOps.posterize(img, max(1, 8 - int(level / MAX_LEVEL * 4))),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, rng: _affine(img, (1, _signed(level, 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, level, rng: _affine(img, (1, 0, 0, _signed(level, 0.3, rng), 1, 0)),
    "TranslateX": lambda img, level, rng: _affine(img, (1, 0, _signed(level, 0.45, rng) * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, level, rng: _affine(img, (1, 0, 0, 0, 1, _signed(level, 0.45, rng) * img.size[1])),
}


# ops that leave every pixel where it is: safe on examples whose boxes or mask would not follow an affine op
PHOTOMETRIC_OPS = ("AutoContrast", "Equalize", "Solarize", "SolarizeAdd", "Posterize", "Color", "Contrast",
                   "Brightness", "Sharpness")


def randaugment(img: Image.Image, num_ops: int, magnitude: float, rng: np.random.Generator,
                prob: float = 0.5, ops: tuple[str, ...] | None = None) -> Image.Image:
    """`num_ops` ops drawn uniformly from `ops` (default: all of RANDAUGMENT_OPS), each applied with `prob`."""
    names = list(ops or RANDAUGMENT_OPS)
    for k in rng.integers(0, len(names), size=num_ops):
        if rng.random() < prob:
            img = RANDAUGMENT_OPS[names[k]](img, float(magnitude), rng)
    return img


# ---- batch mixing ------------------------------------------------------------------------------------------------

def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int, rng: np.random.Generator, *,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
              smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix (one of them, chosen per batch when both are on) of a batch with its reversed order.

    Returns the mixed images and soft labels (B, num_classes); label smoothing is folded into the soft labels.
    """
    off = smoothing / num_classes
    onehot = np.full((len(labels), num_classes), off, np.float32)
    onehot[np.arange(len(labels)), labels] += 1.0 - smoothing
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or rng.random() >= prob:
        return images, onehot
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = images[::-1]
    if use_cutmix:
        h, w = images.shape[1:3]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        images = images.copy()
        images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        images = (lam * images + (1.0 - lam) * flipped).astype(images.dtype)
    return images, (lam * onehot + (1.0 - lam) * onehot[::-1]).astype(np.float32)
