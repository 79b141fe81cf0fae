"""Images into the prompt: files read, cut into the patches the vision tower takes, and their soft
tokens placed among the prompt's tokens.

The preprocessing is that of transformers 5.17.0's Gemma 4 image processor
(`models/gemma4/image_processing_pil_gemma4.py`, Gemma4ImageProcessorPil), and the placement that of
its processor (`processing_gemma4.py`, Gemma4Processor):
  1. read      the file with Pillow, EXIF rotation applied, converted to RGB
  2. resize    keeping the aspect ratio, to the largest size with at most max_patches patches
               (max_soft_tokens * k^2) whose sides are multiples of k * patch_size (bicubic)
  3. rescale   pixels / 255 -> [0, 1] (no mean/std normalisation: the tower maps to [-1, 1] itself)
  4. patchify  row by row, each patch flattened as (row in patch, column in patch, channel)
  5. places    (x, y) of each patch in the grid; padded to max_patches with zero patches at (-1, -1)
  6. prompt    each image token the chat template writes (<|image|>) becomes
               <|image> + n_soft x <|image|> + <image|>, n_soft = patches / k^2 (280 at most, released)

Pillow is needed only here, and only when an image is given. Where torchvision is installed,
transformers picks its torchvision processor instead, whose bicubic resize differs slightly in the
pixels; this follows the Pillow one. Images go with one prompt (the command line's --image, generate's
images=, the server's image_url parts); with --chat, --batch-file, a template or a JSON Schema they
are refused in one line.

    from images import ImageSettings, image_patches
    from PIL import Image
    p = image_patches(Image.new("RGB", (640, 480)), ImageSettings())   # p.n_soft == 252
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_vision
from hfconfig import CheckpointError, read_json
from sampler import RequestError, check_context
from tokenizer import ChatFormat, encode_prompt

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # what the image processor accepts as max_soft_tokens


class ImageError(Exception):
    """An image that cannot be used, named with what to do."""


@dataclass
class ImageSettings:
    """The image processor's settings and the image tokens (the released model's defaults)."""
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    image_token_id: int = 258880
    boi_token_id: int = 255999
    eoi_token_id: int = 258882

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2


@dataclass
class Patches:
    """One image as the tower takes it."""
    pixels: torch.Tensor  # (max_patches, 3 * patch_size^2) float32 in [0, 1], zero past the image
    places: torch.Tensor  # (max_patches, 2) long: (x, y) in the patch grid, (-1, -1) for padding
    n_soft: int  # the soft tokens it becomes in the prompt
    size: tuple[int, int]  # (height, width) after the resize


def image_settings(path: Path, config) -> ImageSettings:
    """A checkpoint's settings: its preprocessor_config.json (or processor_config.json's
    image_processor), else its config.json (config: its DiffusionGemmaConfig)."""
    passthrough = config.passthrough
    vision = passthrough.get("vision_config") or {}
    d = {"patch_size": vision.get("patch_size"), "pooling_kernel_size": vision.get("pooling_kernel_size"),
         "max_soft_tokens": passthrough.get("vision_soft_tokens_per_image")}
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (Path(path) / name).is_file():
            found = read_json(Path(path) / name)
            d.update((found.get(key) or {}) if key else found)
            break
    d.update(image_token_id=config.image_token_id, **{k: passthrough.get(k) for k in ("boi_token_id", "eoi_token_id")})
    s = ImageSettings(**{k: v for k, v in d.items() if k in ImageSettings.__dataclass_fields__ and v is not None})
    if s.max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise CheckpointError(f"{path}: max_soft_tokens {s.max_soft_tokens} is not one of "
                              f"{', '.join(map(str, SOFT_TOKEN_BUDGETS))}; download the checkpoint again")
    return s


def pillow():
    """The PIL.Image module, or an ImageError saying how to get it."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImageError("reading images needs Pillow: pip install pillow") from None
    return Image, ImageOps


def read_image(path, name: str | None = None):
    """The image in a file (a path, or a binary file object called `name`), EXIF rotation applied,
    as RGB (what transformers' load_image gives); an ImageError naming it when it is missing, not
    an image, or cut short."""
    Image, ImageOps = pillow()
    source, path = path, name or path
    try:
        with Image.open(source) as im:
            im.load()  # decodes now: a truncated file fails here, not later
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory, not an image file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read (PNG, JPEG, WebP, GIF, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} cannot be decoded ({e}): the file is damaged or cut short") from None


def target_size(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """Step 2's size: the aspect kept, at most max_patches patches, sides multiples of k * patch."""
    side = s.pooling_kernel_size * s.patch_size
    factor = math.sqrt(s.max_patches * s.patch_size ** 2 / (height * width))
    h, w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise ImageError(f"an image of {width}x{height} pixels is too small to cut into patches")
    longest = (s.max_patches // s.pooling_kernel_size ** 2) * side
    if h == 0:  # a very wide image: one row of squares, as long as the budget allows
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    return h, w


def image_patches(image, s: ImageSettings) -> Patches:
    """Steps 2-5 for a PIL image (RGB)."""
    Image, _ = pillow()
    h, w = target_size(image.height, image.width, s)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=Image.BICUBIC)
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (h, w, 3)
    p = s.patch_size
    rows, cols = h // p, w // p
    patches = x.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    places = np.stack([gx, gy], axis=-1).reshape(rows * cols, 2)
    pad = s.max_patches - rows * cols
    pixels = np.pad(patches, [(0, pad), (0, 0)])
    places = np.pad(places, [(0, pad), (0, 0)], constant_values=-1)
    return Patches(torch.from_numpy(pixels), torch.from_numpy(places).long(),
                   rows * cols // s.pooling_kernel_size ** 2, (h, w))


def checkpoint_of(model) -> Path:
    """The directory a model was loaded from (generate.load), for what is read only when needed."""
    if getattr(model, "checkpoint_dir", None) is None:
        raise RequestError("images need a model loaded with generate.load (the vision tower is read from its checkpoint)")
    return model.checkpoint_dir


def embed_images(model, patches: list) -> torch.Tensor:
    """The soft-token embeddings (n_soft of each image, one after the other, D) of images.Patches,
    by the vision tower of the model's checkpoint, read the first time an image is given."""
    if getattr(model, "vision", None) is None:  # kept out of the model's modules (its state dict, the
        # fast paths' class swaps and the ranks' sharding are the text stack's): a plain attribute
        object.__setattr__(model, "vision", load_vision(checkpoint_of(model), model.device, model.dtype))
    pixels, places = stack(patches)
    with torch.no_grad():
        return model.vision(pixels.to(model.device), places.to(model.device))


def place_images(ids: list[int], n_soft: list[int], s: ImageSettings) -> list[int]:
    """Step 6: each image token of ids, in order, becomes <|image> + n x <|image|> + <image|>; an
    ImageError when the prompt has more or fewer image tokens than there are images."""
    at = [i for i, t in enumerate(ids) if t == s.image_token_id]
    if len(at) != len(n_soft):
        raise ImageError(f"the prompt has {len(at)} place{'s' * (len(at) != 1)} for an image (<|image|>) "
                         f"but {len(n_soft)} image{'s' * (len(n_soft) != 1)} {'were' if len(n_soft) != 1 else 'was'} given: "
                         + ("a raw prompt takes one <|image|> where each image goes" if not at else
                            "give one image per <|image|>"))
    out, last = [], 0
    for i, n in zip(at, n_soft):
        out += ids[last:i] + [s.boi_token_id] + [s.image_token_id] * n + [s.eoi_token_id]
        last = i + 1
    return out + ids[last:]


def stack(patches: list[Patches]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's input for several images: pixels (N, max_patches, 3p^2), places (N, max_patches, 2)."""
    return torch.stack([p.pixels for p in patches]), torch.stack([p.places for p in patches])


def image_prompt(tok, text: str, images: list, s: ImageSettings, config, max_new_tokens: int, *,
                 chat: ChatFormat = ChatFormat(), name: str = "prompt") -> tuple[list[int], list[Patches]]:
    """The token ids of a prompt with images (file paths or PIL images) and their patches: in the
    chat format the images come before the text; a raw prompt writes <|image|> where each goes.
    ImageError for an image that cannot be used or a prompt with no place for it; RequestError
    (sampler) when the images make the prompt too long for the model. No images: encode_prompt's ids."""
    if not images:
        return encode_prompt(tok, text, config, max_new_tokens, chat, name=name), []
    patches = [image_patches(read_image(im) if isinstance(im, (str, Path)) else im.convert("RGB"), s) for im in images]
    ids = encode_prompt(tok, text, config, max_new_tokens, chat, name=name, images=len(images))
    ids = place_images(ids, [p.n_soft for p in patches], s)
    n = len(images)
    check_context(config, len(ids), max_new_tokens, f"{name} with its {n} image{'s' * (n != 1)}")
    return ids, patches
