"""Image preprocessing of the target VLM in numpy + Pillow, bit-compatible with HF's PIL processors.

The parameters come from the bundle (written by `dream_export.families.params_from_hf` at export);
this module never imports torch or transformers. Each step copies what transformers' PIL backend
does, including its numerics, so the runtime feeds the vision graph the same pixels as the HF
processor did when the bundle was validated:

- RGB conversion composites transparency onto white (PIL `alpha_composite`).
- Resizing is Pillow's `Image.resize` on the uint8 image with the processor's filter; the shortest-edge
  size is truncated, not rounded (`int(size * long / short)`), like torchvision.
- Center crop zero-pads when the crop is larger than the image.
- Rescale multiplies in float64 then casts to float32; normalisation runs in float32.

Kinds: "clip" (shortest-edge resize + center crop: CLIP, LLaVA), "siglip" (fixed-size resize: SigLIP,
Gemma3), "pixtral" (fit the longest edge, round up to patches, pad the batch: Mistral3) and "qwen2_vl"
(area-bounded resize to merge-window multiples, flattened patches: Qwen2-VL / Qwen2.5-VL) and "llava_next"
(any-resolution tiling: a base view plus the tiles of the best grid pinpoint, each through the "clip" steps)
and "idefics3" (fit the longest edge, round up to whole crops, split into crops plus a global view).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from dream_export.errors import IncompatibleArtifactError, UsageError

KINDS = ("clip", "siglip", "pixtral", "qwen2_vl", "llava_next", "idefics3")
# do_resize / do_rescale / do_normalize / do_center_crop default to True, as in every HF processor.
_REQUIRED = ("kind", "size", "resample", "rescale_factor", "image_mean", "image_std")
# Resize-size keys each kind understands (any one of the alternatives).
_SIZE_KEYS = {"clip": (("shortest_edge",), ("height", "width")), "llava_next": (("shortest_edge",), ("height", "width")),
              "siglip": (("height", "width"),), "idefics3": (("longest_edge",),),
              "pixtral": (("longest_edge",), ("height", "width")), "qwen2_vl": (("shortest_edge", "longest_edge"),)}
_EXTRA_REQUIRED = {"llava_next": ("crop_size", "image_grid_pinpoints"), "idefics3": ("max_image_size",), "pixtral": ("patch_size",), "qwen2_vl": ("patch_size", "merge_size", "temporal_patch_size")}


class ImagePreprocessor:
    """PIL image(s) → the pixel inputs the family's HF image processor returns (float32, numpy).

    `preprocess` returns the processor's dict ("pixel_values", plus "image_sizes" for Pixtral and
    LLaVA-NeXT, "image_grid_thw" for Qwen2-VL, "pixel_attention_mask", "rows" and "cols" for Idefics3);
    calling the object returns only "pixel_values".
    """

    def __init__(self, params: dict[str, Any]):
        _validate(params)
        self.params = dict(params)
        self.kind: str = params["kind"]
        self._mean = np.asarray(params["image_mean"], dtype=np.float32)
        self._std = np.asarray(params["image_std"], dtype=np.float32)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ImagePreprocessor:
        """Build from the dict `params_from_hf` produced (e.g. read from a bundle)."""
        return cls(params)

    @classmethod
    def from_json(cls, path: str | Path) -> ImagePreprocessor:
        """Build from a JSON file holding that dict."""
        return cls(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def __call__(self, images: Any) -> np.ndarray:
        """One image or a list of images → pixel_values (clip/siglip/pixtral: float32 [N, 3, H, W];
        qwen2_vl: float32 [n_patches, 3·T·p·p])."""
        return self.preprocess(images)["pixel_values"]

    def preprocess(self, images: Any) -> dict[str, np.ndarray]:
        """One image or a list of images → the HF processor's outputs (see the class docstring)."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise UsageError("no image given to preprocess")
        if self.kind == "llava_next":
            rgbs = [to_rgb(im) for im in batch]
            return {"pixel_values": _pad_views([self.anyres_views(rgb) for rgb in rgbs]),
                    "image_sizes": np.array([r.shape[:2] for r in rgbs], dtype=np.int64)}
        if self.kind == "idefics3":
            split = [self.split_views(to_rgb(im)) for im in batch]
            px = _pad_views([views for views, _, _ in split])
            mask = np.zeros((*px.shape[:2], *px.shape[-2:]), dtype=np.int64)  # 1 on real views (HF's pixel mask)
            for i, (views, _, _) in enumerate(split):
                mask[i, :len(views)] = 1
            return {"pixel_values": px, "pixel_attention_mask": mask,
                    "rows": np.array([r for _, r, _ in split], dtype=np.int64),
                    "cols": np.array([c for _, _, c in split], dtype=np.int64)}
        chws = [self.preprocess_one(im) for im in batch]
        if self.kind == "pixtral":
            sizes = np.array([c.shape[1:] for c in chws], dtype=np.int64)
            return {"pixel_values": _pad_batch(chws), "image_sizes": sizes}
        if self.kind == "qwen2_vl":
            p = self.params
            flat = [patchify(c, p["patch_size"], p["merge_size"], p["temporal_patch_size"]) for c in chws]
            grids = [[1, c.shape[1] // p["patch_size"], c.shape[2] // p["patch_size"]] for c in chws]
            return {"pixel_values": np.concatenate(flat), "image_grid_thw": np.array(grids, dtype=np.int64)}
        return {"pixel_values": np.stack(chws)}

    def preprocess_one(self, image: Any) -> np.ndarray:
        """One PIL image (any mode), an HxW / HxWxC uint8 array, or an image path → float32 [3, H, W]
        (before Pixtral's batch padding and Qwen2-VL's patch flattening)."""
        p = self.params
        # Always RGB: the vision towers take 3 channels. HF converts too (do_convert_rgb is on in every
        # supported processor); without it HF would fail on L / RGBA inputs rather than differ.
        rgb = to_rgb(image)
        if p.get("do_resize", True):
            rgb = resize(rgb, self.output_size(rgb.shape[0], rgb.shape[1]), p["resample"])
        chw = np.moveaxis(rgb, -1, 0)
        if self.kind in ("clip", "llava_next") and p.get("do_center_crop", True):
            crop = p["crop_size"]
            chw = center_crop(chw, crop["height"], crop["width"])
        return rescale_normalize(chw, p["rescale_factor"] if p.get("do_rescale", True) else None,
                                 (self._mean, self._std) if p.get("do_normalize", True) else None)

    def anyres_views(self, rgb: np.ndarray) -> list[np.ndarray]:
        """LLaVA-NeXT: uint8 [H, W, 3] → float32 [3, h, w] views: the whole image squashed to the base size,
        then the tiles (row-major) of the image fitted into the best grid pinpoint and zero padded to it."""
        p = self.params
        height, width = rgb.shape[:2]
        target = select_best_resolution((height, width), p["image_grid_pinpoints"])
        fit = fit_inside(height, width, target)
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        top, left = (target[0] - fit[0]) // 2, (target[1] - fit[1]) // 2
        canvas[top:top + fit[0], left:left + fit[1]] = resize(rgb, fit, p["resample"])
        tile = int(p["crop_size"]["height"])
        tiles = [canvas[i:i + tile, j:j + tile] for i in range(0, target[0], tile) for j in range(0, target[1], tile)]
        size = p["size"]
        base = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        # each view then takes the "clip" steps, as HF processes its patches
        return [self.preprocess_one(v) for v in [resize(rgb, base, p["resample"]), *tiles]]

    def split_views(self, rgb: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        """Idefics3: uint8 [H, W, 3] → (float32 [3, S, S] views, rows, cols): the image fitted to the longest
        edge, enlarged to whole crops of S and cut into rows × cols crops (row-major), then the global view
        (the whole image at S × S); an image of one crop, or without splitting, is only its global view."""
        p = self.params
        crop = int(p["max_image_size"]["longest_edge"])
        if p.get("do_resize", True):
            rgb = resize(rgb, idefics3_fit(rgb.shape[0], rgb.shape[1], int(p["size"]["longest_edge"])), p["resample"])
        rows = cols = 0
        if not p.get("do_image_splitting", True):
            views = [resize(rgb, (crop, crop), p["resample"])]
        else:
            rgb = resize(rgb, crop_multiple(rgb.shape[0], rgb.shape[1], crop), p["resample"])
            h, w = rgb.shape[:2]
            views = [rgb]
            if h > crop or w > crop:
                rows, cols = h // crop, w // crop
                views = [rgb[r * crop:(r + 1) * crop, c * crop:(c + 1) * crop] for r in range(rows) for c in range(cols)]
                views.append(resize(rgb, (crop, crop), p["resample"]))
        scale = p["rescale_factor"] if p.get("do_rescale", True) else None
        norm = (self._mean, self._std) if p.get("do_normalize", True) else None
        return [rescale_normalize(np.moveaxis(v, -1, 0), scale, norm) for v in views], rows, cols

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the resize step produces for an input of this size."""
        p, size = self.params, self.params["size"]
        if self.kind == "pixtral":
            limit = (size["longest_edge"],) * 2 if "longest_edge" in size else (size["height"], size["width"])
            return pixtral_size(height, width, limit, (p["patch_size"]["height"], p["patch_size"]["width"]))
        if self.kind == "qwen2_vl":
            return smart_resize(height, width, p["patch_size"] * p["merge_size"], size["shortest_edge"],
                                size["longest_edge"])
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        return shortest_edge_size(height, width, int(size["shortest_edge"]))


def _validate(params: dict[str, Any]) -> None:
    """Reject parameter dicts this runtime cannot reproduce, with the reason."""
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise IncompatibleArtifactError(f"image preprocessing parameters lack {', '.join(missing)}; "
                                        "re-export the bundle")
    kind = params["kind"]
    if kind not in KINDS:
        raise IncompatibleArtifactError(f"image preprocessing kind {kind!r} is not supported by this "
                                        f"runtime (supported: {', '.join(KINDS)})")
    missing = [k for k in _EXTRA_REQUIRED.get(kind, ()) if k not in params]
    if missing:
        raise IncompatibleArtifactError(f"{kind} preprocessing parameters lack {', '.join(missing)}")
    size = params["size"]
    # clip/siglip with a longest_edge cap as well would take HF's other resize rule: refuse, not ignore.
    capped = kind in ("clip", "siglip", "llava_next") and "longest_edge" in size
    if capped or not any(set(keys) <= set(size) for keys in _SIZE_KEYS[kind]):
        raise IncompatibleArtifactError(f"{kind} preprocessing cannot resize to {size}")
    if kind in ("clip", "llava_next") and params.get("do_center_crop", True) and "crop_size" not in params:
        raise IncompatibleArtifactError("clip preprocessing with center crop needs crop_size")
    for key in ("image_mean", "image_std"):
        if len(params[key]) != 3:
            raise IncompatibleArtifactError(f"{key} must have 3 values, got {params[key]}")


# ------------------------------------------------------------------------------------------- steps


def to_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3]. Transparency (an alpha band or a palette/`transparency` entry) is composited
    onto white, as HF's `convert_to_rgb` does for PIL images."""
    if isinstance(image, (str, Path)):
        return to_rgb(load_image(image))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise UsageError(f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}")
    _check_size(image.width, image.height, "the image")
    if image.mode.startswith("I"):  # 16/32-bit grayscale: scale 0..65535 to 8 bits (convert() would clip)
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).round()
                                .astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


# Largest image accepted (Pillow's decompression-bomb limit): beyond it, decoding alone can exhaust memory.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_image(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file (or a binary stream, called `name` in messages). A missing,
    empty, truncated, non-image or oversized image raises `UsageError` naming it (decoding now, not
    lazily, so the error comes before any work)."""
    import warnings

    what = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.width, im.height, what)
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f"{what} is too large to decode safely ({e}); resize it below {MAX_PIXELS} pixels") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        empty = isinstance(path, (str, Path)) and Path(path).is_file() and Path(path).stat().st_size == 0
        reason = "empty file" if empty else str(e)
        raise UsageError(f"{what} is not a readable image ({reason}); pass a PNG, JPEG, WebP or BMP file") from e


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise UsageError(f"{what} is {width}x{height} pixels; pass an image with at least one pixel")
    if width * height > MAX_PIXELS:
        raise UsageError(f"{what} is {width}x{height} pixels, more than the {MAX_PIXELS} accepted; resize it")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """HWC / HW uint8 array → RGB, with HF's numpy formula for 4 channels (round(a·rgb + (1-a)·255))."""
    arr = _as_uint8_array(arr)
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def _as_uint8_array(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise UsageError(f"image arrays must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise UsageError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4; got shape {arr.shape}")
    return arr


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output (height, width) with the short side = `shortest`; the long side is truncated like HF/torchvision."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def resize(rgb: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize of a uint8 [H, W, C] image to (height, width) with filter `resample` (PIL's enum value:
    0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)."""
    height, width = size
    img = Image.fromarray(rgb[..., 0] if rgb.shape[-1] == 1 else rgb)
    out = np.asarray(img.resize((width, height), resample=Image.Resampling(int(resample))))
    return out[..., None] if out.ndim == 2 else out


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of [C, H, W]; a crop larger than the image is zero padded (offsets as HF computes)."""
    _, h, w = chw.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return chw[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil division
    padded = np.zeros((chw.shape[0], new_h, new_w), dtype=chw.dtype)
    padded[:, pad_top:pad_top + h, pad_left:pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def rescale_normalize(chw: np.ndarray, scale: float | None,
                      mean_std: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """float32 [C, H, W]: (x·scale − mean) / std, with HF's precision (scale in float64, the rest float32)."""
    x = (chw.astype(np.float64) * scale).astype(np.float32) if scale is not None else chw.astype(np.float32)
    if mean_std is not None:
        mean, std = mean_std
        x = (x - mean[:, None, None]) / std[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def select_best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """LLaVA-NeXT: the (height, width) pinpoint that keeps most of the image's pixels, then wastes least."""
    height, width = size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def fit_inside(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """LLaVA-NeXT: (height, width) scaled to touch `target` on one side and fit on the other (ceil)."""
    th, tw = target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def idefics3_fit(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3: the longest edge set to `longest` (either way), the other scaled (truncated, rounded up to
    even), capped at 4096 pixels a side."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > 4096:
        width, height = 4096, int(4096 / aspect)
    elif height > width and height > 4096:
        height, width = 4096, int(4096 * aspect)
    return max(height, 1), max(width, 1)


def crop_multiple(height: int, width: int, crop: int) -> tuple[int, int]:
    """Idefics3: both sides rounded up to whole crops, the short one scaled from the rounded long one first."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / crop) * crop
        height = math.ceil(int(width / aspect) / crop) * crop
    else:
        height = math.ceil(height / crop) * crop
        width = math.ceil(int(height * aspect) / crop) * crop
    return height, width


def pixtral_size(height: int, width: int, limit: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """Pixtral: shrink (never enlarge) to fit `limit` keeping the aspect ratio (floor), then round each
    side up to a whole number of patches."""
    ratio = max(height / limit[0], width / limit[1])
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // patch[0] + 1) * patch[0], ((width - 1) // patch[1] + 1) * patch[1]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL: sides divisible by `factor`, area within [min_pixels, max_pixels], aspect kept (Python's
    round-half-even, as the reference)."""
    if max(height, width) / min(height, width) > 200:
        raise UsageError(f"image aspect ratio must be below 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(chw: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """Qwen2-VL's flat patch layout [grid_h·grid_w, C·T·p·p]: patches ordered by merge window (so each
    merge×merge group is contiguous), the still image repeated over the temporal patch."""
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal * patch * patch), dtype=np.float32)


def _pad_views(views: list[list[np.ndarray]]) -> np.ndarray:
    """Per-image lists of [3, h, w] views → [images, most views, 3, h, w], short lists padded with zero
    views (HF's batching of tiled images)."""
    n = max(len(v) for v in views)
    out = np.zeros((len(views), n, *views[0][0].shape), dtype=np.float32)
    for i, v in enumerate(views):
        out[i, :len(v)] = v
    return out


def _pad_batch(chws: list[np.ndarray]) -> np.ndarray:
    """Zero-pad [3, h, w] images bottom/right to the largest h and w and stack (Pixtral's batching)."""
    h = max(c.shape[1] for c in chws)
    w = max(c.shape[2] for c in chws)
    out = np.zeros((len(chws), chws[0].shape[0], h, w), dtype=np.float32)
    for i, c in enumerate(chws):
        out[i, :, :c.shape[1], :c.shape[2]] = c
    return out
