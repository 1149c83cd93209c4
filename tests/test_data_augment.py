"""DomainBed's transforms: exact evaluation values, augmentation ranges and probabilities."""
import numpy as np
import pytest
import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data import augment, decode

MEAN = np.array(defaults.IMAGENET_MEAN, np.float32)
STD = np.array(defaults.IMAGENET_STD, np.float32)


def _seed(i):
    return tf.constant([7, i], tf.int64)


def _unnormalize(x):
    return np.asarray(x) * STD + MEAN


def _traced(fn):
    """`fn(seed)` traced once, so that hundreds of draws stay fast."""
    return tf.function(fn, input_signature=[tf.TensorSpec([2], tf.int64)])


def test_eval_transform_of_a_flat_image_is_its_normalised_colour():
    image = tf.fill([20, 30, 3], tf.constant(51, tf.uint8))
    out = augment.eval_transform(image, (8, 8)).numpy()
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    expected = (51 / 255 - MEAN) / STD
    np.testing.assert_allclose(out, np.broadcast_to(expected, (8, 8, 3)), atol=1e-5)


def test_eval_transform_without_imagenet_keeps_pixels():
    image = tf.constant((np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28, 1))
    out = augment.eval_transform(image, (28, 28), imagenet=False).numpy()
    np.testing.assert_allclose(out, image.numpy() / 255.0, atol=1e-7)
    out = augment.train_transform(image, (28, 28), _seed(0), imagenet=False).numpy()
    np.testing.assert_allclose(out, image.numpy() / 255.0, atol=1e-7)


def test_train_transform_shape_range_and_determinism():
    rng = np.random.RandomState(0)
    image = tf.constant(rng.randint(0, 256, size=(40, 50, 3)).astype(np.uint8))
    outs = [augment.train_transform(image, (16, 16), _seed(i)).numpy() for i in range(20)]
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for out in outs:
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
        assert np.all(out >= low - 1e-5) and np.all(out <= high + 1e-5)
    again = augment.train_transform(image, (16, 16), _seed(3)).numpy()
    np.testing.assert_array_equal(again, outs[3])
    assert not np.allclose(outs[0], outs[1])


def test_crop_box_area_and_aspect():
    shape = tf.constant([100, 120, 3])
    areas, ratios = [], []
    for i in range(300):
        begin, size = augment.crop_box(shape, _seed(i))
        (y, x, _), (h, w, c) = begin.numpy(), size.numpy()
        assert c == -1 or c == 3
        assert 0 <= y and y + h <= 100 and 0 <= x and x + w <= 120
        areas.append(h * w / 12000)
        ratios.append(w / h)
    # Box sides are whole pixels, hence the small tolerance on the ranges.
    assert min(areas) >= 0.7 - 0.02 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.03 and max(ratios) <= 4 / 3 + 0.03
    assert min(areas) < 0.75 and len(set(np.round(areas, 3))) > 50


def test_colour_adjustments_match_torchvision_formulas():
    x = tf.constant([[[0.2, 0.4, 0.6], [0.9, 0.1, 0.5]]], tf.float32)
    px = x.numpy()
    grey = px @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(augment._brightness(x, 1.2).numpy(), np.clip(px * 1.2, 0, 1),
                               atol=1e-6)
    np.testing.assert_allclose(augment._contrast(x, 0.7).numpy(),
                               np.clip(0.7 * px + 0.3 * grey.mean(), 0, 1), atol=1e-4)
    np.testing.assert_allclose(augment._saturation(x, 0.5).numpy(),
                               np.clip(0.5 * px + 0.5 * grey[..., None], 0, 1), atol=1e-4)
    # A hue shift of a whole turn leaves the colour unchanged; half a turn swaps to the opposite.
    np.testing.assert_allclose(augment._hue(x, 0.0).numpy(), px, atol=1e-5)
    opposite = augment._hue(tf.constant([[[1.0, 0.0, 0.0]]]), 0.5).numpy()
    np.testing.assert_allclose(opposite, [[[0.0, 1.0, 1.0]]], atol=1e-5)


def test_colour_jitter_on_grey_only_scales_brightness():
    # On a flat grey image contrast, saturation and hue change nothing, so the output is
    # level * b with b drawn from [0.7, 1.3].
    level = 0.5
    x = tf.fill([4, 4, 3], level)
    jitter = _traced(lambda seed: augment.color_jitter(x, seed))
    factors = []
    for i in range(200):
        out = jitter(_seed(i)).numpy()
        np.testing.assert_allclose(out, out[0, 0, 0], atol=1e-5)
        factors.append(out[0, 0, 0] / level)
    assert 0.7 - 1e-4 <= min(factors) < 0.76 and 1.24 < max(factors) <= 1.3 + 1e-4


def test_colour_jitter_with_zero_strength_is_identity():
    x = tf.constant(np.random.RandomState(1).uniform(size=(5, 5, 3)).astype(np.float32))
    np.testing.assert_allclose(augment.color_jitter(x, _seed(0), strength=0.0).numpy(),
                               x.numpy(), atol=1e-5)


def test_grayscale_probability():
    image = tf.constant(np.random.RandomState(2).randint(0, 256, (12, 12, 3)).astype(np.uint8))
    transform = _traced(lambda seed: augment.train_transform(image, (8, 8), seed))
    grey = 0
    n = 400
    for i in range(n):
        out = _unnormalize(transform(_seed(i)))
        grey += np.allclose(out[..., 0], out[..., 1], atol=1e-4) and np.allclose(
            out[..., 1], out[..., 2], atol=1e-4)
    # p = 0.1: 40 expected; the bounds are more than 3 standard deviations (6) away.
    assert 18 <= grey <= 62


def test_horizontal_flip_probability():
    # Dark left half, bright right half: every crop keeps the centre, and no colour operation
    # reverses the order of two grey levels, so the sides show whether the image was flipped.
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 200
    transform = _traced(lambda seed: augment.train_transform(tf.constant(image), (16, 16), seed))
    flipped = 0
    n = 200
    for i in range(n):
        out = _unnormalize(transform(_seed(i)))
        left, right = out[:, :4].mean(), out[:, -4:].mean()
        assert left != pytest.approx(right, abs=1e-3)
        flipped += left > right
    assert 70 <= flipped <= 130


def _jpeg(shape, seed, **kwargs):
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    pixels = tf.image.resize(coarse[None], shape, method="bicubic")[0].numpy()
    pixels = np.clip(pixels + rng.normal(0, 10, size=pixels.shape), 0, 255).astype(np.uint8)
    if kwargs.pop("grey", False):
        pixels = pixels[..., :1]
    return tf.io.encode_jpeg(pixels, **kwargs)


def _windows(h, w, rng, n):
    for _ in range(n):
        y, x = rng.randint(0, h), rng.randint(0, w)
        yield [y, x, 0], [rng.randint(1, h - y + 1), rng.randint(1, w - x + 1), -1]


@pytest.mark.parametrize("kwargs", [
    {"quality": 90}, {"quality": 75, "chroma_downsampling": False},
    {"quality": 90, "progressive": True}, {"grey": True}])
def test_jpeg_window_decode_equals_decode_then_crop(kwargs):
    """4:2:0 (the first and third cases) needs the margin; 4:4:4 and grey are exact anyway."""
    rng = np.random.RandomState(0)
    for trial, (h, w) in enumerate([(37, 53), (120, 90), (64, 200)]):
        encoded = _jpeg((h, w), trial, **dict(kwargs))
        whole = decode.decode(encoded, 3).numpy()
        for begin, size in _windows(h, w, rng, 15):
            crop = decode.decode_window(encoded, 3, lambda shape, b=begin, s=size: (
                tf.constant(b), tf.constant(s))).numpy()
            np.testing.assert_array_equal(crop, whole[begin[0]:begin[0] + size[0],
                                                      begin[1]:begin[1] + size[1]])


def test_jpeg_window_decode_without_the_margin_differs_at_420(monkeypatch):
    # libjpeg-turbo's cropped decode upsamples 4:2:0 chroma as if the crop's side columns were
    # the image's edges: this is what the margin repairs.
    monkeypatch.setattr(decode, "JPEG_CROP_MARGIN", 0)
    encoded = _jpeg((120, 90), 1, quality=90)
    whole = decode.decode(encoded, 3).numpy()
    differ = 0
    for begin, size in _windows(120, 90, np.random.RandomState(1), 20):
        crop = decode.decode_window(encoded, 3, lambda shape, b=begin, s=size: (
            tf.constant(b), tf.constant(s))).numpy()
        differ += not np.array_equal(crop, whole[begin[0]:begin[0] + size[0],
                                                 begin[1]:begin[1] + size[1]])
    assert differ >= 5


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_fused_training_transform_equals_decode_then_transform(fmt):
    pixels = np.random.RandomState(3).randint(0, 256, size=(41, 57, 3)).astype(np.uint8)
    encoded = (tf.io.encode_jpeg(pixels, quality=90) if fmt == "jpg"
               else tf.io.encode_png(pixels))
    for i in range(8):
        fused = augment.train_transform_encoded(encoded, (24, 24), _seed(i)).numpy()
        plain = augment.train_transform(decode.decode(encoded, 3), (24, 24), _seed(i)).numpy()
        np.testing.assert_array_equal(fused, plain)


@pytest.mark.parametrize("shape", [(30, 40), (10, 12), (20, 9), (16, 16)])
def test_resize_matches_pil_bilinear(shape):
    """Shrinking antialiases, enlarging interpolates: PIL's bilinear resize either way."""
    pil_image = pytest.importorskip("PIL.Image")
    pixels = np.random.RandomState(4).randint(0, 256, size=(*shape, 3)).astype(np.uint8)
    ours = augment._resize(tf.constant(pixels), (16, 16)).numpy()
    ref = np.asarray(pil_image.fromarray(pixels).resize((16, 16), pil_image.BILINEAR))
    # PIL rounds its 8-bit result and works in fixed point: within one level, mostly equal
    # after rounding (80-100% here; plain bilinear shrinking 30x40 differs by up to 100 levels
    # and agrees on 1%).
    assert np.abs(ours - ref).max() <= 1.0
    assert (np.round(ours) == ref).mean() > 0.75
