"""
Reading X-ray files fast: JPEGs decoded at reduced size, DICOMs scaled to 8 bits, and the optional
`--image-cache DIR`, where each image's small decoded copy is kept after its first read (about 40x
faster for the 2 MB JPEGs of full-resolution CheXpert; the same pixels); and reporting the files
that cannot be read, once each. Not part of the method: cleft.load_image turns what read_xray
returns into the model's input view.
"""

import hashlib
import os
import sys
import tempfile
import uuid
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

UNREADABLE = set()  # 'path (error)' of every unreadable image met in this run, on every rank
UNUSABLE = set()  # image cache folders found unwritable (each is reported once)


def read_xray(path, size, cache=""):
    """The image at `path` as an 8-bit grayscale PIL image whose shorter side is >= size, through
    the cache folder when one is given."""
    return cached_xray(path, size, cache) if cache else decode_xray(path, size)


def decode_xray(path, size):
    """Shrunk by a whole factor while the shorter side stays >= size: a JPEG is decoded at 1/2,
    1/4 or 1/8 scale (draft mode), others are box-reduced. A DICOM (optional pydicom) is scaled
    by its maximum, MONOCHROME1 inverted (RSNA)."""
    if str(path).lower().endswith(".dcm"):
        import pydicom
        dicom = pydicom.dcmread(path)
        pixels = dicom.pixel_array.astype(np.float32)
        pixels = pixels / max(float(pixels.max()), 1e-6)
        if dicom.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 1 - pixels
        image = Image.fromarray((pixels * 255).astype(np.uint8))
    else:
        with Image.open(path) as image:
            image.draft("L", (size, size))
            image = image.convert("L")
    factor = min(image.size) // size
    return image.reduce(factor) if factor > 1 else image


def rank_0():  # this process prints the run's messages: plain python, or rank 0 under torchrun
    return not dist.is_initialized() or dist.get_rank() == 0


def usable_cache(cache):
    """`cache`, or '' when that folder cannot be written: checked once, in the main process of
    each rank (rank 0 says so, above the progress bar); images are then decoded each time, which
    costs speed, never an image."""
    try:
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=cache).close()
        return cache
    except OSError as error:
        if cache not in UNUSABLE and rank_0():
            tqdm.write(f"warning: cannot write to the image cache {cache} ({error.strerror}): "
                       "images are decoded without it", file=sys.stderr)
        UNUSABLE.add(cache)
        return ""


def cached_xray(path, size, cache):
    """decode_xray through a folder of .npy files keyed by path, size and modification time: the
    first read stores the decoded image, later reads load it. Entries are written under a unique
    temporary name and renamed, so workers and ranks on any host can share the folder; a damaged
    entry is decoded again, and a full or read-only disk costs speed, never an image."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{size}"
    key = hashlib.sha1(key.encode()).hexdigest()
    file = Path(cache, key[:2], key + ".npy")
    with suppress(OSError, ValueError, EOFError):  # not cached yet, or a damaged entry
        return Image.fromarray(np.load(file, allow_pickle=False))
    image, temp = decode_xray(path, size), file.with_suffix(f".{uuid.uuid4().hex}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as f:
            np.save(f, np.asarray(image))
        os.replace(temp, file)
    except OSError as error:  # the disk filled up mid-run: a loader worker's rare warning
        warnings.warn(f"cannot write to the image cache {cache} ({error.strerror}): images are "
                      "decoded without it")
        with suppress(OSError):
            temp.unlink()  # a partly written entry
    return image


def report_unreadable(messages):
    """Rank 0 prints each unreadable image once per run, above the progress bar, whichever rank or
    split met it; all ranks call this at the same points (it gathers). messages: the 'path (error)'
    lines of cleft.XrayDataset's items, emptied here."""
    new = {line for text in messages for line in text.split("\n") if line}
    if dist.is_initialized():  # loader workers only hand them over: their rank reports them
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, new)
        new = set().union(*everyone)
    if rank_0():
        for line in sorted(new - UNREADABLE):
            tqdm.write(f"warning: skipping unreadable image {line}", file=sys.stderr)
            sys.stderr.flush()
    UNREADABLE.update(new)
    messages.clear()
