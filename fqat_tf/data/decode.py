"""Image decoding, with a crop window decoded on its own when the file is a JPEG.

RandomResizedCrop keeps 70-100% of the image, so most of the decode is of pixels that are kept;
decoding only the window still saves the rows above and below it, and the colour conversion and
upsampling of everything outside it. The window is drawn from the shape in the JPEG header
(`tf.io.extract_jpeg_shape`, which reads no pixel data), then `tf.io.decode_and_crop_jpeg`
decodes it. Other formats (PNG, GIF, BMP, WebP) are decoded whole and then cropped.

libjpeg-turbo decodes a crop exactly, with one exception found by comparing the two paths:
with 4:2:0 chroma subsampling its "fancy" chroma upsampling treats the left and right edges of
the cropped region as edges of the image, so the first and last columns of a crop can differ
from the same columns of a full decode (by up to ~20 levels). The window is therefore widened by
`JPEG_CROP_MARGIN` columns on each side and the margin cut off after decoding, which makes the
result equal, bit for bit, to decoding the whole image and cropping it.
"""
from typing import Callable, Tuple

import tensorflow as tf

# Columns decoded beyond each side of a JPEG crop window. One column suffices for 2x horizontal
# chroma subsampling (the fancy upsampler reads one neighbouring chroma sample); one iMCU of
# 4:2:0 (16 columns) leaves room for any sampling factor libjpeg-turbo upsamples with context.
JPEG_CROP_MARGIN = 16


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """The uint8 pixels (H, W, channels) of an encoded image (the first frame of a GIF)."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


Window = Callable[[tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]


def _decode_jpeg_window(encoded, channels, window):
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, size = window(tf.stack([shape[0], shape[1], channels]))
    left = tf.maximum(begin[1] - JPEG_CROP_MARGIN, 0)
    right = tf.minimum(begin[1] + size[1] + JPEG_CROP_MARGIN, shape[1])
    crop = tf.io.decode_and_crop_jpeg(encoded, tf.stack([begin[0], left, size[0], right - left]),
                                      channels=channels)
    return crop[:, begin[1] - left:begin[1] - left + size[1]]


def _decode_whole_then_crop(encoded, channels, window):
    image = decode(encoded, channels)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)


def decode_window(encoded: tf.Tensor, channels: int, window: Window) -> tf.Tensor:
    """Decodes the part of an encoded image that `window` chooses from the image's shape.

    Args:
        encoded: the file's bytes (scalar string).
        channels: channels of the output (1 or 3), converted as `tf.io.decode_image` does.
        window: maps the image shape (H, W, channels), int32 [3], to `(begin, size)` as
            `tf.slice` takes them (as `augment.crop_box` returns them).

    Returns:
        uint8 (h, w, channels): exactly the pixels of `decode(encoded, channels)` in the window.
    """
    crop = tf.cond(tf.io.is_jpeg(encoded),
                   lambda: _decode_jpeg_window(encoded, channels, window),
                   lambda: _decode_whole_then_crop(encoded, channels, window))
    crop.set_shape([None, None, channels])
    return crop
