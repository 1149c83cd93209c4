"""DomainBed's image transforms as stateless TensorFlow functions.

Training (DomainBed `augment_transform`): RandomResizedCrop(size, scale 0.7-1.0, ratio 3/4-4/3),
RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(p=0.1), ImageNet
normalisation. Evaluation: resize to size x size, normalise.

Every random choice is a `tf.random.stateless_*` or `tf.image.stateless_*` op keyed by an
explicit seed, so an image's augmentation depends only on (stream seed, position in the
stream): the stream is reproducible and its iterator can be checkpointed. Keras's random
preprocessing layers draw from a seed-generator variable instead, which a tf.data iterator
checkpoint does not capture, so they are not used here. ColorJitter is written out because
torchvision's factors differ from `tf.image`'s: brightness and contrast are multiplicative and
saturation blends with the grey image, each factor drawn from [1 - 0.3, 1 + 0.3], and the four
adjustments run in a random order.
"""
from typing import Sequence, Tuple

import tensorflow as tf

from fqat_tf import defaults


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return tf.image.convert_image_dtype(image, tf.float32)


def normalize(image: tf.Tensor, mean: Sequence[float] = defaults.IMAGENET_MEAN,
              std: Sequence[float] = defaults.IMAGENET_STD) -> tf.Tensor:
    """ImageNet normalisation of a float image in [0, 1]."""
    return (image - tf.constant(mean, image.dtype)) / tf.constant(std, image.dtype)


def _resize(image: tf.Tensor, size: Tuple[int, int]) -> tf.Tensor:
    # Antialiasing matches PIL's resize, which torchvision's Resize and RandomResizedCrop use.
    out = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)


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
    x = to_float(image)
    if not imagenet:
        return x
    return normalize(_resize(x, size))


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
    seeds = tf.random.experimental.stateless_split(seed, 5)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = [tf.random.stateless_uniform([], seeds[k], low, high) for k in range(3)]
    hue = tf.random.stateless_uniform([], seeds[3], -strength, strength)
    ops = [
        lambda y: _brightness(y, factors[0]),
        lambda y: _contrast(y, factors[1]),
        lambda y: _saturation(y, factors[2]),
        lambda y: _hue(y, hue),
    ]
    order = tf.random.experimental.stateless_shuffle(tf.range(4), seeds[4])

    # One switch inside a loop traces each adjustment once, not once per position.
    def step(k, y):
        return k + 1, tf.switch_case(order[k], [lambda op=op: op(y) for op in ops])

    _, x = tf.while_loop(lambda k, _: k < 4, step, (tf.constant(0), x))
    return x


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


def random_resized_crop(image: tf.Tensor, size: Tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """A `crop_box` of a uint8 image (H, W, C), resized to `size`; float32 in [0, 1]."""
    begin, box = crop_box(tf.shape(image), seed)
    return _resize(to_float(tf.slice(image, begin, box)), size)


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
    seeds = tf.random.experimental.stateless_split(seed, 4)
    x = random_resized_crop(image, size, seeds[0])
    x = tf.image.stateless_random_flip_left_right(x, seeds[1])
    x = color_jitter(x, seeds[2])
    grey = tf.random.stateless_uniform([], seeds[3]) < defaults.GRAYSCALE_PROB
    x = tf.where(grey, tf.tile(_grey(x), [1, 1, 3]), x)
    return normalize(x)
