"""From preprocessed images to the rows spliced into the prompt, and the placeholder text each image takes.

The vision graph encodes *views* (a whole image, or the base view and tiles of an any-resolution image)
into a fixed number of rows each. How a family lays those rows out in the prompt is recorded in the
bundle's manifest (`vision`, written by `families.VLM.vision_layout` at export) and reproduced here in
numpy, so the runtime needs no torch:

- "single" (LLaVA, Gemma3): one view per image, its rows in order; the placeholder is the image token
  repeated, framed by the layout's `before` / `after` text where the processor writes one (Gemma3: the
  template's `placeholder` <start_of_image> becomes blank lines, <start_of_image>, the image tokens,
  <end_of_image>).
- "anyres" (LLaVA-NeXT): the base view's rows, then the tile rows arranged as one feature map over the
  best grid pinpoint, the padding the tiling added cropped away ("unpadding") and the learned
  image-newline row appended after every feature row; the placeholder repeats the image token once per
  row, a count that depends on the image's size.
- "split" (Idefics3 / SmolVLM): the rows of each crop, row-major, then of the global view; the placeholder
  wraps each crop's image tokens in the processor's marker tokens (`<fake_token_around_image>`,
  `<row_r_col_c>`, a newline after each crop row, `<global-img>` before the global view).
- "rows" (Mistral3 / Pixtral): one view per image at its own size (the vision graph's grid is dynamic);
  one row per merged patch, the placeholder `[IMG]` per merged patch with `[IMG_BREAK]` after each row
  and `[IMG_END]` last.
- "grid" (Qwen2.5-VL): one call per image over its flattened patches (`patches` vary with its size) plus
  the grid's window order, rotary positions and attention masks (`runtime.vision_grid`); one row per
  merged unit, the placeholder the image token repeated once per row (the template frames it with
  `<|vision_start|>` / `<|vision_end|>`).

`feeds` gives the vision graph's inputs for an image by spec name (`core.graph_spec.VISION`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dream_export.errors import IncompatibleArtifactError, UsageError
from dream_export.runtime.preprocess import select_best_resolution
from dream_export.runtime.vision_grid import vision_grid_inputs

LAYOUTS = ("single", "anyres", "split", "rows", "grid")


@dataclass
class ImageLayout:
    """One family's image layout (`from_manifest`); `inputs` are `ImagePreprocessor.preprocess` outputs."""

    kind: str
    rows_per_view: int
    params: dict
    newline: np.ndarray | None = None  # anyres: the image-newline row [H]

    @classmethod
    def from_manifest(cls, manifest: dict, tensors: dict[str, np.ndarray]) -> ImageLayout:
        """The layout a bundle records; bundles without a `vision` entry encode one view per image."""
        v = manifest.get("vision") or {"layout": "single",
                                       "rows_per_view": manifest["tokens"]["image_tokens_per_image"]}
        kind = v.get("layout")
        if kind not in LAYOUTS:
            raise IncompatibleArtifactError(f"image layout {kind!r} is not supported by this runtime "
                                            f"(supported: {', '.join(LAYOUTS)})")
        newline = None
        if kind == "anyres":
            if v.get("newline") not in tensors:
                raise IncompatibleArtifactError("the bundle's anyres image layout lacks its image-newline row")
            newline = tensors[v["newline"]].astype(np.float32)
        return cls(kind, int(v.get("rows_per_view", 0)), dict(v), newline)

    @property
    def variable(self) -> bool:
        """Whether the number of image tokens depends on the image."""
        return self.kind != "single"

    # ------------------------------------------------------------------------------------ per image

    def images(self, inputs: dict | None) -> int:
        """Images in a preprocessed batch (a "grid" batch concatenates their patches)."""
        if inputs is None:
            return 0
        return len(inputs["image_grid_thw"] if self.kind == "grid" else inputs["pixel_values"])

    def views(self, inputs: dict, i: int) -> np.ndarray:
        """The vision graph's input for image `i` of a preprocessed batch: float32 [views, 3, h, w]."""
        px = inputs["pixel_values"]
        if self.kind == "single":
            return px[i:i + 1]
        if self.kind == "split":
            return px[i, :self._split_views(inputs, i)]
        if self.kind == "rows":  # the image without the batch's padding
            h, w = (int(x) for x in inputs["image_sizes"][i])
            return px[i:i + 1, :, :h, :w]
        if self.kind == "grid":  # the image's patches among the batch's concatenated ones
            sizes = np.prod(inputs["image_grid_thw"], -1)
            return px[int(sizes[:i].sum()):int(sizes[:i + 1].sum())]
        return px[i, :self._grid(inputs["image_sizes"][i])[2] + 1]

    def feeds(self, inputs: dict, i: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs for image `i`, by spec name: its views, and for "grid" the bookkeeping
        of its patch grid."""
        feeds = {"pixel_values": self.views(inputs, i)}
        if self.kind == "grid":
            feeds.update(vision_grid_inputs(inputs["image_grid_thw"][i:i + 1], self.params["merge"],
                                            self.params["window"]))
        return feeds

    def count(self, inputs: dict | None, i: int = 0) -> int:
        """Image tokens image `i` takes in the prompt (`inputs` None: only for layouts of fixed size)."""
        if self.kind == "single":
            return self.rows_per_view
        if inputs is None:
            raise UsageError("the number of image tokens depends on the image: pass the image")
        if self.kind == "split":
            return self.rows_per_view * self._split_views(inputs, i)
        if self.kind == "rows":
            rows, cols = self._merged_grid(inputs, i)
            return rows * cols
        if self.kind == "grid":
            return int(np.prod(inputs["image_grid_thw"][i])) // self.params["merge"] ** 2
        rows, cols = self._unpadded(inputs["image_sizes"][i])
        return self.rows_per_view + (rows[1] - rows[0]) * (cols[1] - cols[0] + 1)

    def placeholder(self, image_token: str) -> str:
        """What the chat template writes where an image goes (the image token unless the layout names one)."""
        return self.params.get("placeholder") or image_token

    def text(self, inputs: dict | None, i: int, image_token: str) -> str:
        """The placeholder text image `i` expands to (what the family's HF processor writes)."""
        if self.kind == "single":
            return self.params.get("before", "") + image_token * self.count(inputs, i) + self.params.get("after", "")
        if self.kind in ("anyres", "grid"):
            return image_token * self.count(inputs, i)
        if inputs is None:
            raise UsageError("the number of image tokens depends on the image: pass the image")
        if self.kind == "rows":
            return pixtral_text(*self._merged_grid(inputs, i), image_token, self.params["break"], self.params["end"])
        p, rows, cols = self.params, int(inputs["rows"][i]), int(inputs["cols"][i])
        view = image_token * self.rows_per_view
        crops = "".join("".join(p["around"] + p["crop"].format(row=r + 1, col=c + 1) + view for c in range(cols)) + "\n"
                        for r in range(rows))
        glob = p["around"] + p["global"] + view + p["around"]
        return crops + "\n" + glob if rows else glob

    def pack(self, feats: np.ndarray, inputs: dict, i: int) -> np.ndarray:
        """The vision graph's output for image `i` ([views, rows_per_view, H]) → prompt rows [n, H]."""
        if self.kind != "anyres":
            return feats.reshape(-1, feats.shape[-1])
        size = inputs["image_sizes"][i]
        nh, nw, _ = self._grid(size)
        g = self.params["grid"]
        hidden = feats.shape[-1]
        fmap = feats[1:].reshape(nh, nw, g, g, hidden).transpose(0, 2, 1, 3, 4).reshape(nh * g, nw * g, hidden)
        (r0, r1), (c0, c1) = self._unpadded(size)
        fmap = fmap[r0:r1, c0:c1]
        nl = np.broadcast_to(self.newline.astype(feats.dtype), (fmap.shape[0], 1, hidden))
        return np.concatenate([feats[0], np.concatenate([fmap, nl], 1).reshape(-1, hidden)])

    def encode(self, inputs: dict, n_images: int, run: Callable[[dict[str, np.ndarray]], np.ndarray]) -> list[np.ndarray]:
        """Prompt rows of each image: `run` is the vision graph (`feeds` by spec name → [views, rows, H])."""
        return [self.pack(run(self.feeds(inputs, i)), inputs, i) for i in range(n_images)]

    def _merged_grid(self, inputs: dict, i: int) -> tuple[int, int]:
        """Pixtral: (rows, columns) of merged patches of image `i`."""
        h, w = (int(x) for x in inputs["image_sizes"][i])
        return h // self.params["step"], w // self.params["step"]

    @staticmethod
    def _split_views(inputs: dict, i: int) -> int:
        """Idefics3: the real (not batch-padding) views of image `i`, from the processor's pixel mask (its
        output has no rows and columns)."""
        return int(inputs["pixel_attention_mask"][i].any((-2, -1)).sum())

    # ------------------------------------------------------------------------------------- anyres

    def _grid(self, image_size) -> tuple[int, int, int]:
        """(tile rows, tile columns, tiles) of the pinpoint an image of (height, width) is tiled into."""
        h, w = select_best_resolution((int(image_size[0]), int(image_size[1])), self.params["pinpoints"])
        tile = self.params["tile"]
        return h // tile, w // tile, (h // tile) * (w // tile)

    def _unpadded(self, image_size) -> tuple[tuple[int, int], tuple[int, int]]:
        """Row and column ranges of the tile feature map that the image covers (HF's `unpad_image`)."""
        oh, ow = int(image_size[0]), int(image_size[1])
        nh, nw, _ = self._grid(image_size)
        ch, cw = nh * self.params["grid"], nw * self.params["grid"]
        if ow / oh > cw / ch:
            pad = (ch - int(round(oh * (cw / ow), 7))) // 2
            return (pad, ch - pad), (0, cw)
        pad = (cw - int(round(ow * (ch / oh), 7))) // 2
        return (0, ch), (pad, cw - pad)


def pixtral_text(rows: int, cols: int, image: str, brk: str, end: str) -> str:
    """Pixtral's placeholder of a rows × cols grid of merged patches: a row of `image` tokens then `brk`,
    `end` instead of the last `brk` (what PixtralProcessor writes)."""
    return (image * cols + brk) * (rows - 1) + image * cols + end
