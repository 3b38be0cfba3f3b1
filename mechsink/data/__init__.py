"""Image/question datasets: folders, JSONL/CSV/Parquet tables, local Hugging Face datasets,
and the POPE, MME and MMStar benchmark layouts.

    ds = open_dataset("toy-llava-eval")                # bundled
    ds = open_dataset("pope:coco_pope_random.json", images_root="val2014")
    errors = ErrorLog()
    for sample, image in iter_images(ds.subset(100), errors=errors):
        ...
    errors.write(run_dir)                              # run_dir/errors.jsonl
"""

from mechsink.data.core import Dataset, Sample
from mechsink.data.errors import DataError, ImageError
from mechsink.data.images import DEFAULT_MAX_SIDE, IMAGE_EXTENSIONS, ErrorLog, SkippedImage, decode_image, iter_images
from mechsink.data.open import BUNDLED_DATASETS, FORMATS, default_data, detect_format, open_dataset

__all__ = [
    "BUNDLED_DATASETS",
    "DEFAULT_MAX_SIDE",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Dataset",
    "ErrorLog",
    "ImageError",
    "Sample",
    "SkippedImage",
    "decode_image",
    "default_data",
    "detect_format",
    "iter_images",
    "open_dataset",
]
