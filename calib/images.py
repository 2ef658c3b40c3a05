"""Image data: a folder of photos becomes model feeds with the model's declared preprocessing.

Preprocessing (a dict, recorded in the config and the artifact README so an app does the same):
  resize  short side in pixels before cropping (default crop * 256 / 224, as ImageNet models)
  crop    square centre crop in pixels (default: the model input's height)
  mean, std  per channel, on 0-255 pixel values: x = (pixel - mean) / std
  layout  "NCHW" (PyTorch) or "NHWC"; channel order is RGB.

A folder with sub-folders of images is a labelled set: the sub-folder name is the class (an index
of the model's output, or a label name when the model has them).

Views: evaluation can use several views per photo (scales, shifted crops, mirror images), as a
device's camera would frame the same scene differently; calibration uses other views than
evaluation, so no evaluated input was calibrated on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.core import EdgeqError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# (resize factor vs the default resize, crop offset x, offset y in [-1, 1], mirror)
EVAL_VIEWS = [(1.0, 0, 0, False), (1.0, 0, 0, True), (224 / 256, 0, 0, False), (1.125, -0.8, -0.8, False),
              (1.125, 0.8, 0.8, False), (1.125, 0.8, -0.8, True), (1.25, 0, 0, False), (1.25, -0.6, 0.6, True),
              (1.5, 0, 0, False), (1.5, 0.7, -0.7, False), (1.75, -0.5, 0.0, False), (1.75, 0.0, 0.5, True)]
CALIB_VIEWS = [(0.94, 0.5, 0.0, False), (1.06, -0.5, 0.3, True), (1.19, 0.3, -0.9, False), (1.31, -0.9, 0.2, True),
               (1.41, 0.9, 0.9, False), (1.625, -0.3, -0.3, True), (1.875, 0.4, 0.4, False), (0.906, 0, 0, True)]


def resolve_preprocess(given: dict, input_shape: list[int]) -> dict:
    """Fill the defaults of a preprocessing dict and check it; `input_shape` is the model's
    [batch, C, H, W] (or [batch, H, W, C] for NHWC)."""
    known = {"resize", "crop", "mean", "std", "layout"}
    unknown = set(given) - known
    if unknown:
        raise EdgeqError(f"unknown preprocessing key(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    layout = str(given.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise EdgeqError(f"preprocessing layout must be NCHW or NHWC, got {layout}")
    if len(input_shape) != 4:
        raise EdgeqError(f"an image model takes a 4-D input, this one {input_shape}")
    h = input_shape[2] if layout == "NCHW" else input_shape[1]
    channels = input_shape[1] if layout == "NCHW" else input_shape[3]
    crop = int(given.get("crop", h))
    resize = int(given.get("resize", round(crop * 256 / 224)))
    if crop != h:
        raise EdgeqError(f"preprocessing crop {crop} does not match the model's input size {h}")
    if resize < crop:
        raise EdgeqError(f"preprocessing resize {resize} is smaller than the crop {crop}")

    def per_channel(key, default):
        v = given.get(key, default)
        v = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * channels)]
        if len(v) != channels:
            raise EdgeqError(f"preprocessing {key} needs {channels} values, got {len(v)}")
        return v
    std = per_channel("std", [58.395, 57.12, 57.375])  # torchvision's ImageNet values x 255
    if any(s <= 0 for s in std):
        raise EdgeqError("preprocessing std values must be positive")
    return {"resize": resize, "crop": crop, "mean": per_channel("mean", [123.675, 116.28, 103.53]),
            "std": std, "layout": layout, "color": "RGB", "channels": channels}


def parse_preprocess(text: str | None) -> dict:
    """`resize=256,crop=224,mean=127,std=128,layout=NCHW` (a value may be a list: mean=123.7/116.3/103.5)."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise EdgeqError(f"--preprocess: expected key=value, got {part!r}")
        key = key.strip()
        try:
            if key == "layout":
                out[key] = value.strip()
            elif "/" in value:
                out[key] = [float(v) for v in value.split("/")]
            else:
                out[key] = float(value) if key in ("mean", "std") else int(value)
        except ValueError:
            raise EdgeqError(f"--preprocess: {key} needs a number, got {value!r}") from None
    return out


def image_files(folder: Path, what: str) -> list[tuple[Path, str | None]]:
    """(image, class) pairs, sorted: class = sub-folder name in a labelled set, None otherwise."""
    if not folder.is_dir():
        raise EdgeqError(f"{what} images: not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise EdgeqError(f"{what} folder {folder} has no images ({', '.join(sorted(EXTENSIONS))})")
    labelled = all(p.parent != folder for p in files)
    return [(p, p.parent.relative_to(folder).parts[0] if labelled else None) for p in files]


def load_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))  # transparent pixels on white
                bg.paste(im, mask=im.split()[3])
                return bg
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EdgeqError(f"cannot read image {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def view(img, pre: dict, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0, mirror: bool = False) -> np.ndarray:
    """One preprocessed view [1, C, H, W] (or NHWC): resize the short side, crop (shifted by dx, dy
    toward the edges), mirror, normalize."""
    from PIL import Image, ImageOps

    crop = pre["crop"]
    short = max(crop, int(round(pre["resize"] * scale)))
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - crop) / 2 * (1 + dx))), int(round((h - crop) / 2 * (1 + dy)))
    img = img.crop((left, top, left + crop, top + crop))
    if mirror:
        img = ImageOps.mirror(img)
    a = np.asarray(img, dtype=np.float32)
    if pre["channels"] == 1:
        a = a.mean(-1, keepdims=True)
    a = (a - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    if pre["layout"] == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a[None])


def image_arrays(folder: Path, pre: dict, input_name: str, limit: int | None, views: list,
                 what: str) -> tuple[dict[str, np.ndarray], list[str | None], list[str]]:
    """({input_name: [N, ...]}, class per sample, sample names "file#view") for up to `limit`
    samples, each photo giving len(views) samples."""
    xs, labels, names = [], [], []
    for path, label in image_files(folder, what):
        img = load_rgb(path)
        for i, v in enumerate(views):
            if limit is not None and len(xs) >= limit:
                break
            xs.append(view(img, pre, *v))
            labels.append(label)
            names.append(f"{path.relative_to(folder).as_posix()}#{i}")
        if limit is not None and len(xs) >= limit:
            break
    return {input_name: np.concatenate(xs)}, labels, names


def offline_photos(out: Path) -> int:
    """Copy the colour photos that ship inside scikit-image's wheel (read as files; no import) into
    `out`: real photos for calibration and evaluation of vision models without a download."""
    import shutil

    from edgeq.calib import package_data_dir

    src = package_data_dir("scikit-image", "skimage/data", "bundled photos")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png", "camera.png",
             "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png", "cell.png", "page.png"]
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            n += 1
    if not n:
        raise EdgeqError(f"no photos found in {src}")
    return n


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgeq.calib.images OUT_DIR   (copies scikit-image's bundled photos)")
    try:
        print(f"{offline_photos(Path(sys.argv[1]))} photos in {sys.argv[1]}")
    except EdgeqError as e:
        sys.exit(f"error: {e}")
