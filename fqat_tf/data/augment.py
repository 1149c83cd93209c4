"""DomainBed's image transforms as stateless TensorFlow functions.

Training (DomainBed `augment_transform`): RandomResizedCrop(size, scale 0.7-1.0, ratio 3/4-4/3),
RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(p=0.1), ImageNet
normalisation. Evaluation: resize to size x size, normalise.

Every random choice is a `tf.random.stateless_*` or `tf.image.stateless_*` op keyed by an
explicit seed, so an image's augmentation depends only on (stream seed, domain, position in the
domain's stream): the stream is reproducible whatever the devices or the global seed. Keras's
random preprocessing layers draw from a seed-generator variable instead, so they are not used
here. ColorJitter is written out because torchvision's factors differ from `tf.image`'s:
brightness and contrast are multiplicative and saturation blends with the grey image, each factor
drawn from [1 - 0.3, 1 + 0.3], and the four adjustments run in a random order.

Speed (`benchmarks/input_pipeline.py`): a JPEG's crop window is decoded alone (`decode`); the
resize antialiases only when it shrinks (PIL's bilinear filter equals plain bilinear
interpolation when enlarging); everything after the resize (flip, jitter, grayscale,
normalisation: a dozen full-image passes, the hue conversion the dearest) is one XLA-compiled
function of the resized image and ten uniform draws, which fuses those passes into a few
(about 8x faster than running them as separate ops).
"""
from typing import Sequence, Tuple

import tensorflow as tf

from fqat_tf import defaults
from fqat_tf.data import decode as decode_lib

# Uniform draws per image after the crop: flip, three jitter factors, the hue shift, four keys
# whose ranks give the order of the jitter adjustments, grayscale.
_DRAWS = 10


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return tf.image.convert_image_dtype(image, tf.float32)


def normalize(image: tf.Tensor, mean: Sequence[float] = defaults.IMAGENET_MEAN,
              std: Sequence[float] = defaults.IMAGENET_STD) -> tf.Tensor:
    """ImageNet normalisation of a float image in [0, 1]."""
    return (image - tf.constant(mean, image.dtype)) / tf.constant(std, image.dtype)


def _resize(image: tf.Tensor, size: Tuple[int, int]) -> tf.Tensor:
    """Bilinear resize as PIL's (torchvision's Resize and RandomResizedCrop): float32 in the
    input's value range.

    PIL widens its triangle filter when it shrinks (antialiasing) and uses plain bilinear
    interpolation when it enlarges; `antialias=True` costs 3-5x plain bilinear, so it is paid
    only where an axis shrinks.
    """
    shape = tf.shape(image)
    enlarges = tf.logical_and(shape[0] <= size[0], shape[1] <= size[1])
    return tf.cond(enlarges,
                   lambda: tf.image.resize(image, size, method="bilinear"),
                   lambda: tf.image.resize(image, size, method="bilinear", antialias=True))


def _grey(x: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(x)


def _brightness(x, factor):
    return tf.clip_by_value(x * factor, 0.0, 1.0)


def _contrast(x, factor):
    mean = tf.reduce_mean(_grey(x))
    return tf.clip_by_value(factor * x + (1.0 - factor) * mean, 0.0, 1.0)


def _saturation(x, factor):
    return tf.clip_by_value(factor * x + (1.0 - factor) * _grey(x), 0.0, 1.0)


def _hue(x, delta):
    return tf.clip_by_value(tf.image.adjust_hue(x, delta), 0.0, 1.0)


def _jitter(x: tf.Tensor, u: tf.Tensor, strength: float) -> tf.Tensor:
    """ColorJitter from 8 uniform draws `u`: 3 factors, the hue shift, 4 keys of the order."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = low + (high - low) * u[0:3]
    hue = strength * (2.0 * u[3] - 1.0)
    ops = [
        lambda y: _brightness(y, factors[0]),
        lambda y: _contrast(y, factors[1]),
        lambda y: _saturation(y, factors[2]),
        lambda y: _hue(y, hue),
    ]
    # The ranks of four uniforms are a uniformly random order of the four adjustments.
    order = tf.argsort(u[4:8])
    for k in range(4):
        x = tf.switch_case(order[k], [lambda op=op, y=x: op(y) for op in ops])
    return x


def color_jitter(x: tf.Tensor, seed: tf.Tensor, strength: float = defaults.COLOR_JITTER
                 ) -> tf.Tensor:
    """torchvision's ColorJitter(strength, strength, strength, strength) on a float RGB image.

    Args:
        x: float32 (H, W, 3) in [0, 1].
        seed: int64 [2] stateless seed.
        strength: jitter of brightness, contrast, saturation (factor in [1 - s, 1 + s]) and hue
            (shift in [-s, s] of the hue circle).

    Returns:
        The jittered image, in [0, 1].
    """
    return _jitter(x, tf.random.stateless_uniform([8], seed), strength)


@tf.function(jit_compile=True)
def _finish_train(x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Flip, ColorJitter, RandomGrayscale and normalisation of a resized image in [0, 255]."""
    x = tf.clip_by_value(x / 255.0, 0.0, 1.0)
    x = tf.where(u[0] < 0.5, tf.reverse(x, [1]), x)
    x = _jitter(x, u[1:9], defaults.COLOR_JITTER)
    x = tf.where(u[9] < defaults.GRAYSCALE_PROB, tf.tile(_grey(x), [1, 1, 3]), x)
    return normalize(x)


@tf.function(jit_compile=True)
def _finish_eval(x: tf.Tensor) -> tf.Tensor:
    return normalize(tf.clip_by_value(x / 255.0, 0.0, 1.0))


# The transforms hold no Python control flow on tensors, so AutoGraph has nothing to convert;
# skipping it makes tracing a stream several times faster.
@tf.autograph.experimental.do_not_convert
def eval_transform(image: tf.Tensor, size: Tuple[int, int], imagenet: bool = True) -> tf.Tensor:
    """DomainBed's evaluation transform of one uint8 image (H, W, C).

    Args:
        image: uint8 pixels.
        size: (height, width) of the output.
        imagenet: resize and normalise (photos); False returns the pixels in [0, 1] as they are
            (rotated MNIST).

    Returns:
        float32 (height, width, C).
    """
    if not imagenet:
        return to_float(image)
    return _finish_eval(_resize(image, size))


def crop_box(image_shape: tf.Tensor, seed: tf.Tensor,
             scale: Sequence[float] = defaults.RESIZED_CROP_SCALE,
             ratio: Sequence[float] = defaults.RESIZED_CROP_RATIO) -> Tuple[tf.Tensor, tf.Tensor]:
    """RandomResizedCrop's box: `scale` of the area, width / height in `ratio`.

    Args:
        image_shape: (H, W, C).
        seed: int64 [2] stateless seed.
        scale: range of the box's fraction of the image area.
        ratio: range of the box's width / height.

    Returns:
        (begin, size) for `tf.slice`; the whole image when 10 draws find no box that fits.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def _draws(seed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """The crop's seed and the other draws of one image."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    return seeds[0], tf.random.stateless_uniform([_DRAWS], seeds[1])


@tf.autograph.experimental.do_not_convert
def train_transform(image: tf.Tensor, size: Tuple[int, int], seed: tf.Tensor,
                    imagenet: bool = True) -> tf.Tensor:
    """DomainBed's training transform of one uint8 image.

    Args:
        image: uint8 (H, W, 3) (or (H, W, C) when `imagenet` is False).
        size: (height, width) of the output.
        seed: int64 [2] stateless seed; the same seed gives the same output.
        imagenet: False leaves the image unaugmented and unnormalised (rotated MNIST, which
            DomainBed does not augment).

    Returns:
        float32 (height, width, C): ImageNet-normalised for photos, in [0, 1] otherwise.
    """
    if not imagenet:
        return to_float(image)
    crop_seed, u = _draws(seed)
    begin, box = crop_box(tf.shape(image), crop_seed)
    return _finish_train(_resize(tf.slice(image, begin, box), size), u)


@tf.autograph.experimental.do_not_convert
def train_transform_encoded(encoded: tf.Tensor, size: Tuple[int, int], seed: tf.Tensor,
                            channels: int = 3) -> tf.Tensor:
    """`train_transform(decode(encoded), size, seed)` with the crop decoded alone from a JPEG.

    The crop box is drawn from the same shape with the same seed, so the output equals the
    decode-then-crop path's exactly (`decode.decode_window`).
    """
    crop_seed, u = _draws(seed)
    crop = decode_lib.decode_window(encoded, channels, lambda shape: crop_box(shape, crop_seed))
    return _finish_train(_resize(crop, size), u)
