"""Datasets for fpbma: TFDS random-access sources, offline builders, batching, few-shot, shift.

>>> import fpbma.data
>>> src = fpbma.data.load("digits", "train")          # built offline on first use
>>> src[0]["image"].shape, src.info.num_classes
((8, 8, 1), 10)
>>> idx = fpbma.data.few_shot(src, k=4, seed=0)        # 4 indices per class
>>> len(idx), sorted({int(src[int(i)]["label"]) for i in idx}) == list(range(10))
(40, True)

``corrupt_images(images, corruption, severity, indices)`` gives the rows of the corrupted test sets
``load("<base>_corrupted/<corruption>_<severity>", "test")`` for any images; ``registry`` holds the
datasets fpbma builds itself.

Everything reads TFDS ``array_record`` files through ``tfds`` data sources; TensorFlow is not needed
at run time (only to *prepare* most of the paper's TFDS datasets, see ``prepare``).
"""

from fpbma.data.builders import MissingSourceError
from fpbma.data.few_shot import (
    CoopEntry,
    FewShotSplit,
    coop_subsets,
    few_shot,
    few_shot_split,
    stratified_holdout,
    read_coop_split,
)
from fpbma.data.pipeline import batches, num_batches
from fpbma.data.shifted import corrupt_images
from fpbma.data.sources import (
    KNOWN_DATASETS,
    OFFLINE_DATASETS,
    PAPER_DATASETS,
    SHIFTED_DATASETS,
    DatasetMetadata,
    DatasetNotPreparedError,
    Source,
    default_data_dir,
    info,
    load,
    prepare,
)

__all__ = [
    "CoopEntry", "DatasetMetadata", "DatasetNotPreparedError", "FewShotSplit", "KNOWN_DATASETS",
    "MissingSourceError", "OFFLINE_DATASETS", "PAPER_DATASETS", "SHIFTED_DATASETS", "Source", "batches",
    "coop_subsets", "corrupt_images", "default_data_dir", "few_shot", "few_shot_split", "stratified_holdout", "info", "load", "num_batches",
    "prepare", "read_coop_split",
]
