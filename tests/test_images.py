import io

import numpy as np
import pytest
from PIL import Image

from digit_demo.images import MAX_PIXELS, ImageError, expand_paths, load_image


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb(fixture_images):
    real = Image.open(next(fixture_images.glob("*.png")))
    for mode in ("L", "RGBA", "P", "CMYK", "LA"):
        out = load_image(png_bytes(real.convert(mode)) if mode != "CMYK" else png_bytes(real.convert(mode), "JPEG"))
        assert out.mode == "RGB" and out.size == real.size


def test_rgba_transparency_goes_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(img)).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grayscale_is_scaled():
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    img = load_image(png_bytes(Image.fromarray(arr)))
    px = np.asarray(img)
    assert img.mode == "RGB" and px.min() == 0 and px.max() == 255
    assert load_image(arr.astype(np.uint16)).mode == "RGB"


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_arrays_and_paths(fixture_images, tmp_path):
    path = next(fixture_images.glob("*.png"))
    assert load_image(path).size == load_image(np.asarray(Image.open(path))).size
    assert load_image(np.zeros((10, 12), np.float32)).size == (12, 10)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((3, 4, 5, 6)))


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable image"),
])
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data, name="upload")


def test_truncated_png(fixture_images):
    data = next(fixture_images.glob("*.png")).read_bytes()
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_zero_size_and_huge_images(tmp_path):
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))
    side = int(MAX_PIXELS ** 0.5) + 10
    huge = png_bytes(Image.new("1", (side, side)))  # small file, huge canvas
    with pytest.raises(ImageError, match="more than"):
        load_image(huge)


def test_missing_file_and_globs(fixture_images, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    assert len(expand_paths([str(fixture_images)])) == 8
    assert len(expand_paths([str(fixture_images / "1*.png")])) == len(list(fixture_images.glob("1*.png")))
    with pytest.raises(FileNotFoundError):
        expand_paths([str(tmp_path / "*.png")])
