"""TFDS builders for PACS and Office-Home, and reading any DomainBed dataset through TFDS.

TFDS has no PACS or Office-Home builder, and neither can be downloaded without accepting a
licence, so these builders read a manual download (as TFDS does for such data): the DomainBed
folder layout placed in TFDS's manual folder. Importing this module registers them:

    import fqat_tf.data.tfds_builders  # registers "pacs" and "office_home"
    ds = tfds.load("pacs/sketch", split="train",
                   download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                       manual_dir="/data/domainbed")})

Each domain is one builder config with one split, "train", holding the whole domain (the
DomainBed protocol splits it itself). DomainNet uses TFDS's own `domainnet` builder, whose
configs are the same six domains with "train" and "test" splits, read here as one domain.
"""
import functools
import inspect
import os
from typing import List, Tuple

import tensorflow_datasets as tfds
from etils import epath

from fqat_tf.data import folder as folder_lib
from fqat_tf.data.registry import DATASETS, DataError, DatasetInfo

# The TFDS splits that together make one DomainBed domain.
TFDS_SPLITS = {"domainnet": "train+test", "pacs": "train", "office_home": "train"}

_INSTRUCTIONS = """\
Download {name} as DomainBed does (`python -m domainbed.scripts.download`, or from the dataset's
homepage), and place it in the manual folder so that the images are at
`<manual_dir>/{folder}/<domain>/<class>/<image>` (or `<manual_dir>/<domain>/<class>/<image>`),
with domains {domains}. The default manual folder is `<data_dir>/downloads/manual/`; another
can be passed as `tfds.download.DownloadConfig(manual_dir=...)`.
"""


class _DomainFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A DomainBed image-folder dataset with one config per domain."""

    INFO: DatasetInfo
    HOMEPAGE = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves the code path of a builder outside its own package through
        # `importlib_resources`, which it does not install on Python >= 3.9; this is the same
        # path, found without it.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=list(self.INFO.class_names)),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        root = folder_lib.dataset_root(os.fspath(dl_manager.manual_dir), self.INFO.folder,
                                       self.INFO.domains)
        domain = {_config_name(d): d for d in self.INFO.domains}[self.builder_config.name]
        return {"train": self._generate_examples(root, domain)}

    def _generate_examples(self, root, domain):
        # Every file is decoded once here, so a damaged image fails the preparation by name.
        class_names, (domain_files,), _ = folder_lib.read_folder_tree(
            root, [domain], self.INFO.class_names, verify="decode")
        for path, label in zip(domain_files.paths, domain_files.labels):
            key = os.path.relpath(path, root)
            yield key, {"image": path, "label": class_names[label], "filename": key}


def _configs(info: DatasetInfo) -> List[tfds.core.BuilderConfig]:
    return [tfds.core.BuilderConfig(name=_config_name(d), description=f"The {d} domain.")
            for d in info.domains]


def _config_name(domain: str) -> str:
    # TFDS config names cannot hold spaces ("Real World").
    return domain.replace(" ", "_")


class Pacs(_DomainFolderBuilder):
    """PACS (Li et al., ICCV 2017): 4 domains, 7 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "DomainBed's PACS folder layout, one config per domain."}
    INFO = DATASETS["pacs"]
    HOMEPAGE = "https://domaingeneralization.github.io/#data"
    BUILDER_CONFIGS = _configs(INFO)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        name="PACS", folder=INFO.folder, domains=list(INFO.domains))


class OfficeHome(_DomainFolderBuilder):
    """Office-Home (Venkateswara et al., CVPR 2017): 4 domains, 65 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "DomainBed's office_home folder layout, one config per domain."}
    INFO = DATASETS["office_home"]
    HOMEPAGE = "https://www.hemanthdv.org/officeHomeDataset.html"
    BUILDER_CONFIGS = _configs(INFO)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        name="Office-Home", folder=INFO.folder, domains=list(INFO.domains))


def _builder(info: DatasetInfo, domain: str, data_dir):
    name = f"{info.tfds_name}/{_config_name(domain)}"
    builder = tfds.builder(name, data_dir=data_dir)
    # Prepares on first use: downloads DomainNet, reads the manual folder for PACS/Office-Home.
    builder.download_and_prepare()
    return name, builder


def read_tfds_domains(info: DatasetInfo, data_dir=None) -> Tuple[Tuple[str, ...], list]:
    """Opens every domain of `info` through TFDS.

    Returns:
        (class names, `(size, (builder name with config, split, data_dir))` per domain, in
        `info.domains` order: what `fqat_tf.data.splits` makes a whole-domain `Source` of).

    Raises:
        DataError: the builder's classes are not the dataset's.
    """
    split = TFDS_SPLITS[info.tfds_name]
    class_names, sources = None, []
    for domain in info.domains:
        name, builder = _builder(info, domain, data_dir)
        names = tuple(builder.info.features["label"].names)
        if len(names) != info.num_classes or (class_names is not None and names != class_names):
            raise DataError(f"TFDS {name} has classes {names[:5]}... ({len(names)}); expected "
                            f"{info.num_classes} classes shared by every domain")
        class_names = names
        n = int(builder.as_dataset(split=split).cardinality())
        if n <= 0:
            raise DataError(f"TFDS {name} split {split!r} has an unknown or zero size ({n})")
        sources.append((n, (name, split, data_dir)))
    return class_names, sources


@functools.lru_cache(maxsize=None)
def _opened_builder(name: str, data_dir):
    # Every split of every domain opens its builder; reading its metadata once is enough.
    return tfds.builder(name, data_dir=data_dir)


def open_tfds(source, shuffle_files: bool = False):
    """The examples of a TFDS source's domain as (encoded image, label), in file order.

    The images stay encoded so that buffers hold bytes, not pixels; the pipeline decodes them.
    """
    name, split, data_dir = source.tfds
    ds = _opened_builder(name, data_dir).as_dataset(split=split, shuffle_files=shuffle_files,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex["image"], ex["label"]))
