"""The datasets of the DomainBed protocol: names, domains, classes and input shapes.

One plain dict, `DATASETS`, maps a dataset name to its `DatasetInfo`, as DomainBed lists its
datasets in `datasets.py`. Domain and class order follow DomainBed: domains in the order of its
`ENVIRONMENTS` (sorted folder names), classes sorted as torchvision's `ImageFolder` sorts them,
so that a domain index or a class id means the same thing here as in DomainBed's results.
"""
import collections.abc
import dataclasses
from typing import Optional, Tuple

from fqat_tf import defaults
from fqat_tf.errors import UserError


class DataError(UserError):
    """Bad data or a bad data argument, found before any training starts (or, through
    `explain_input_error`, an image file that changed while a run read it)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training program needs to know about a dataset.

    Attributes:
        name: key in `DATASETS`.
        domains: domain names in DomainBed's environment order (empty for `image_folder`, whose
            domains are discovered at load time).
        num_classes: number of classes (None for `image_folder`).
        input_shape: (H, W, C) of the float32 images fed to the model.
        imagenet: whether the DomainBed photo transforms apply (augmentation for training,
            resize and ImageNet normalisation everywhere); False for rotated MNIST, whose pixels
            are fed as they are, in [0, 1].
        folder: the dataset's folder under a DomainBed data root (`ROOT/<folder>/<domain>/...`),
            or None where there is no folder layout.
        tfds_name: TFDS builder with one config per domain (`<tfds_name>/<domain>`), or None.
        class_names: class folder names in label order, where they are fixed in advance.
        test_groups: the test-domain groups of the leave-out protocol (one domain each, except
            DomainNet's three pairs).
    """

    name: str
    domains: Tuple[str, ...]
    num_classes: Optional[int]
    input_shape: Tuple[int, int, int]
    imagenet: bool
    folder: Optional[str] = None
    tfds_name: Optional[str] = None
    class_names: Optional[Tuple[str, ...]] = None
    test_groups: Tuple[Tuple[str, ...], ...] = ()

    def __post_init__(self):
        if not self.test_groups and self.domains:
            object.__setattr__(self, "test_groups", tuple((d,) for d in self.domains))


PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")

# The Office-Home folder names, in the order `sorted()` gives them (upper case sorts before
# lower case, so "TV" precedes "Table" as in ImageFolder).
OFFICE_HOME_CLASSES = tuple(sorted((
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
    "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade",
    "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio",
    "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
    "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
)))

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
# Leave-one-group-out (paper §5.1): each pair is held out together.
DOMAINNET_GROUPS = (("clipart", "infograph"), ("painting", "quickdraw"), ("real", "sketch"))

ROTATED_MNIST_DOMAINS = tuple(str(a) for a in defaults.ROTATED_MNIST_ANGLES)

_PHOTO_SHAPE = (defaults.IMAGE_SIZE, defaults.IMAGE_SIZE, 3)

DATASETS = {
    "pacs": DatasetInfo(
        name="pacs", domains=("art_painting", "cartoon", "photo", "sketch"), num_classes=7,
        input_shape=_PHOTO_SHAPE, imagenet=True, folder="PACS", tfds_name="pacs",
        class_names=PACS_CLASSES),
    "office_home": DatasetInfo(
        name="office_home", domains=("Art", "Clipart", "Product", "Real World"), num_classes=65,
        input_shape=_PHOTO_SHAPE, imagenet=True, folder="office_home", tfds_name="office_home",
        class_names=OFFICE_HOME_CLASSES),
    "domain_net": DatasetInfo(
        name="domain_net", domains=DOMAINNET_DOMAINS, num_classes=345, input_shape=_PHOTO_SHAPE,
        imagenet=True, folder="domain_net", tfds_name="domainnet", test_groups=DOMAINNET_GROUPS),
    "rotated_mnist": DatasetInfo(
        name="rotated_mnist", domains=ROTATED_MNIST_DOMAINS, num_classes=10,
        input_shape=(28, 28, 1), imagenet=False, tfds_name="mnist"),
    "rotated_mnist_5k": DatasetInfo(
        name="rotated_mnist_5k", domains=ROTATED_MNIST_DOMAINS, num_classes=10,
        input_shape=(28, 28, 1), imagenet=False),
    "image_folder": DatasetInfo(
        name="image_folder", domains=(), num_classes=None, input_shape=_PHOTO_SHAPE,
        imagenet=True),
}


def get_info(name: str) -> DatasetInfo:
    """Returns the registered `DatasetInfo` of `name`.

    Raises:
        DataError: `name` is not a registered dataset.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_domains(domains, names: Tuple[str, ...], what: str = "test domain") -> Tuple[str, ...]:
    """Turns domain names or indices into domain names, in the order given.

    A string names a domain (exact match first, then case-insensitive); a string of digits that
    is no domain's name, or an int, is an index into `names`. So for rotated MNIST "0" and "75"
    name the 0- and 75-degree domains, while for PACS "0" is art_painting.

    Args:
        domains: one domain or a sequence of them.
        names: the dataset's domain names.
        what: how the error messages call these domains.

    Returns:
        The domain names, without duplicates.

    Raises:
        DataError: a name or index matches no domain, or a domain is given twice.
    """
    if isinstance(domains, str) or not isinstance(domains, collections.abc.Iterable):
        domains = (domains,)
    resolved = []
    for d in domains:
        resolved.append(_resolve_one(d, names, what))
    duplicates = sorted({d for d in resolved if resolved.count(d) > 1})
    if duplicates:
        raise DataError(f"{what} given twice: {duplicates}")
    return tuple(resolved)


def _resolve_one(domain, names, what):
    if isinstance(domain, bool):
        raise DataError(f"{what} {domain!r} is neither a domain name nor an index")
    if isinstance(domain, int):
        if not 0 <= domain < len(names):
            raise DataError(f"{what} index {domain} out of range: the domains are "
                            f"{list(enumerate(names))}")
        return names[domain]
    if isinstance(domain, str):
        if domain in names:
            return domain
        folded = [n for n in names if n.lower() == domain.lower()]
        if len(folded) == 1:
            return folded[0]
        if domain.isdigit():
            return _resolve_one(int(domain), names, what)
    raise DataError(f"unknown {what} {domain!r}; the domains are {list(names)}")
