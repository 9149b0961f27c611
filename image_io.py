"""
From an X-ray file to the model's input: JPEGs decoded at reduced size, DICOMs windowed as a
viewer shows them, the optional `--image-cache DIR` (each image's small decoded copy kept after its
first read: about 40x faster for the 2 MB JPEGs of full-resolution CheXpert, the same pixels), the
view the model sees (padded to a square; in training, zoom, rotation, shift and jitter), and the
dataset that stands the next image in for an unreadable one and reports each such file once, the
loaders that serve it (their workers outlive the stop signals a job's processes all get); and the
overlay of a score map on a view (predict.py). cleft.py decides which images and targets; this file
reads them.
"""

import hashlib
import os
import signal
import struct
import sys
import tempfile
import threading
import uuid
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

UNREADABLE = set()  # 'path (error)' of every unreadable image met in this run, on every rank
UNUSABLE = set()  # image cache folders found unwritable (each is reported once)


def read_xray(path, size, cache=""):
    """The image at `path` as an 8-bit grayscale PIL image whose shorter side is >= size, through
    the cache folder when one is given."""
    return cached_xray(path, size, cache) if cache else decode_xray(path, size)


def decode_xray(path, size):
    """Shrunk by a whole factor while the shorter side stays >= size: a JPEG is decoded at 1/2,
    1/4 or 1/8 scale (draft mode), others are box-reduced; a DICOM is read as dicom_pixels."""
    if is_dicom(path):
        image = Image.fromarray(np.uint8(np.round(255 * dicom_pixels(path))))
    else:
        with Image.open(path) as image:
            image.draft("L", (size, size))
            image = image.convert("L")
    factor = min(image.size) // size
    return image.reduce(factor) if factor > 1 else image


def is_dicom(path):
    """Named .dcm, or marked as DICOM by its content: 'DICM' after the 128-byte preamble (the files
    of a DICOMDIR export have no suffix)."""
    if str(path).lower().endswith(".dcm"):
        return True
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B, as PIL's convert('L')


def dicom_pixels(path):
    """A DICOM's pixels (its first frame) in [0, 1] as a viewer shows them (pydicom): the modality
    LUT (rescale slope and intercept), then the VOI LUT or else the first stored window, whose
    output range is what the lowest and highest storable values become; without either (or with
    an empty one), the image's minimum to maximum. MONOCHROME1 (white is 0) is inverted. Colour
    (RGB, YBR, or PALETTE COLOR through its table) becomes its luminance."""
    dicom, stored = read_dicom(path)  # first: it says what to install when pydicom is missing
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    if dicom.PhotometricInterpretation == "PALETTE COLOR":  # each stored value indexes a table
        rgb = through_lut(apply_color_lut, stored, dicom)
        return rgb @ LUMA / np.iinfo(rgb.dtype).max  # 8- or 16-bit table entries
    if stored.ndim == 3:  # RGB, or YBR that pydicom has turned into RGB
        return stored @ LUMA / (2**dicom.BitsStored - 1)
    has_voi_lut = bool(dicom.get("VOILUTSequence"))  # as pydicom decides: not when empty
    has_window = "WindowCenter" in dicom and "WindowWidth" in dicom  # a centre alone is none

    def modality(stored):  # rescaled; whole numbers for a VOI LUT, a table
        values = through_lut(apply_modality_lut, stored, dicom)
        return np.round(values).astype(np.int64) if has_voi_lut else values

    values = modality(stored)
    if has_voi_lut or has_window:
        bits = dicom.BitsStored
        storable = np.array([0, 2**bits - 1] if dicom.PixelRepresentation == 0  # unsigned
                            else [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
        low, high = through_lut(apply_voi_lut, modality(storable), dicom)
        values = through_lut(apply_voi_lut, values, dicom)
    else:
        low, high = values.min(), values.max()
    pixels = np.clip((values - low) / max(float(high - low), 1e-6), 0, 1)
    return 1 - pixels if dicom.PhotometricInterpretation == "MONOCHROME1" else pixels


def read_dicom(path):
    """The DICOM dataset at `path` and its first frame's stored values (RGB for YBR), or a
    ValueError with the reason, which the dataset reports as an unreadable image's: not DICOM,
    damaged, no pixel data, no decoder for its compression."""
    try:
        import pydicom.pixels  # noqa: F401 (new in pydicom 3)
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError
    except ImportError as error:  # a DICOM without the .dcm name, which require_pydicom misses
        raise ValueError("a DICOM file: pip install 'pydicom>=3' to read it") from error
    damaged = pydicom_errors()
    try:
        dicom = dcmread(path)
        for keyword in ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]:
            if keyword in dicom and dicom[keyword].is_empty:
                del dicom[keyword]  # exports leave some empty: read as absent, not as None
        dicom.pixel_array_options(index=0)  # only the first frame is decoded
        dicom.get("VOILUTSequence")  # a damaged sequence is decoded here, where it is caught
    except InvalidDicomError as error:  # named .dcm, but empty, say
        raise ValueError("not a DICOM file: no 'DICM' marker at byte 128") from error
    except damaged as error:
        raise ValueError(f"not a readable DICOM file: {one_line(error)}") from error
    if "PixelData" not in dicom:
        raise ValueError("a DICOM file without pixel data (a report or an index?)")
    try:
        return dicom, dicom.pixel_array
    except RuntimeError as error:  # pydicom: no decoder for the compression, or all failed
        raise ValueError(undecodable(dicom, error)) from error
    except damaged as error:  # the image's description (rows, bits, ...) or its pixel data
        raise ValueError(f"DICOM pixel data not readable: {one_line(error)}") from error


def through_lut(apply, values, dicom):  # one of pydicom's LUTs: a damaged table is a reason
    try:
        return apply(values, dicom)
    except pydicom_errors() as error:
        raise ValueError(f"DICOM lookup table not usable: {one_line(error)}") from error


def pydicom_errors():
    """What pydicom raises for a DICOM file cut short or damaged: an element's length, type or
    value, a table's size, a transfer syntax that does not exist."""
    from pydicom.errors import BytesLengthException
    return (BytesLengthException, EOFError, struct.error, AttributeError, NotImplementedError,
            TypeError, ValueError)


def undecodable(dicom, error):
    """Why pydicom decoded no pixels (a decoder missing, or damage), with the pip install that adds
    a decoder for a JPEG, JPEG-LS or JPEG 2000 transfer syntax (pydicom 3's pylibjpeg plugins;
    python-gdcm decodes most of them too). pillow decodes 8-bit JPEG and JPEG 2000 already."""
    from pydicom import uid
    syntax = dicom.file_meta.get("TransferSyntaxUID")  # None where damage took it
    reason = f"DICOM pixel data not decoded: {one_line(error)}"  # pydicom's names the syntax
    if syntax in uid.JPEGTransferSyntaxes + uid.JPEGLSTransferSyntaxes:  # 12-bit, lossless, -LS
        return f"{reason} (pip install pylibjpeg pylibjpeg-libjpeg adds a decoder)"
    if syntax in [uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL,
                  uid.HTJ2K]:
        return f"{reason} (pip install pylibjpeg pylibjpeg-openjpeg adds a decoder)"
    return reason  # one pydicom decodes itself, or cannot decode at all


def one_line(error):  # pydicom's messages span lines; the reports are one line per image
    return " ".join(str(error).split())


def require_pydicom(records):
    """One clear error, before any loader starts, when files named .dcm meet no pydicom 3. Only
    names are checked (reading every file's marker would be slow): a DICOM with another name is
    reported unreadable, with the same advice."""
    if any(str(path).lower().endswith(".dcm") for path, _ in records):
        try:
            import pydicom.pixels  # noqa: F401
        except ImportError:
            raise SystemExit("error: the images include DICOM files: pip install 'pydicom>=3', "
                             "or convert them to PNG." if rank_0() else 1)


def make_loader(dataset, batches, num_workers, device, persistent=False):
    """A DataLoader of the batches a sampler yields (its workers outlive stop signals: below).
    num_workers -1: the node's cores shared among its ranks, one left for each."""
    if num_workers < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_workers = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
    # a generator of its own: starting the workers draws nothing from the global RNG, so when a
    # loader starts changes neither the model's initialisation nor anything seeded after it
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                      persistent_workers=persistent and num_workers > 0,
                      worker_init_fn=outlive_stop_signals)


def outlive_stop_signals(worker_id):
    """A loader worker's start: the SIGTERM and Ctrl-C that torchrun, SLURM or a terminal send to
    every process leave it running, so its rank can finish the step and save first. A SIGTERM
    from its own rank, which is how a loader shuts its workers down, still ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there a SIGTERM ends workers at once
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the thread below takes it
        threading.Thread(target=exit_on_sigterm_from_parent, daemon=True).start()


def exit_on_sigterm_from_parent():
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass  # sent to the whole job: the rank decides
    os._exit(0)


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
    lines of XrayDataset's items."""
    new = {line for text in messages for line in text.split("\n") if line}
    if dist.is_initialized():  # loader workers only hand them over: their rank reports them
        count = torch.tensor(len(new))  # a CPU tensor: gloo, on the host
        dist.all_reduce(count)  # cheap: the lines themselves are gathered only if there are any
        if count > 0:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, new)
            new = set().union(*everyone)
    if rank_0():
        for line in sorted(new - UNREADABLE):
            tqdm.write(f"warning: skipping unreadable image {line}", file=sys.stderr)
            sys.stderr.flush()
    UNREADABLE.update(new)


# -----------------------------------------------------------------------------
# The model's input view, and the dataset that reads it


def scaled_view(square, size, rng=None):
    """The square scaled to size x size; with rng, training's zoom (1 to 1.15), rotation (+-10
    degrees) and a random crop of the zoomed square."""
    if rng is None:
        return square.resize((size, size), Image.Resampling.BILINEAR)
    side = round(size * rng.uniform(1.0, 1.15))
    image = square.resize((side, side), Image.Resampling.BILINEAR)
    image = image.rotate(rng.uniform(-10, 10), Image.Resampling.BILINEAR)
    left, top = rng.integers(0, side - size + 1, size=2)
    return image.crop((left, top, left + size, top + size))


def jitter(pixels, rng, hflip=False):  # contrast and brightness by +-20%, an optional flip
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.clip(pixels, 0, 1)


SQUARES = ["pad", "crop"]  # how an image becomes square: black borders, or its centre


def load_image(path, size, rng=None, hflip=False, affine=True, cache="", square="pad"):
    """A (1, size, size) tensor in [0, 1]. rng=None: the evaluation view; else the training view,
    jittered, with zoom, rotation and shift when `affine` (--augment cleft). square: 'pad' keeps
    the whole image within black borders, 'crop' keeps the centre square."""
    image = read_xray(path, size, cache)  # 8-bit grayscale, decoded at reduced size
    side = (max if square == "pad" else min)(image.size)
    left = -((side - image.width) // 2)  # the image centred in the square (or the square in it)
    top = -((side - image.height) // 2)
    square = image.crop((left, top, left + side, top + side))  # PIL fills outside it with black
    image = scaled_view(square, size, rng if affine else None)
    pixels = np.asarray(image, np.float32) / 255
    if rng is not None:
        pixels = jitter(pixels, rng, hflip)
    # one channel: a third of the bytes through the loader; the image tower makes it three
    return torch.from_numpy(np.ascontiguousarray(pixels))[None]  # (1, S, S)


class NoReadableImage(RuntimeError):
    """A split none of whose images can be read: the run ends with one `error:` line (below)."""


def one_line_for_unreadable_splits(kind, error, trace, default=sys.excepthook):
    """sys.excepthook: NoReadableImage, raised in a loader worker and raised again by the loader
    with the worker's traceback in its text, is printed as its last line alone (by rank 0)."""
    if not issubclass(kind, NoReadableImage):
        return default(kind, error, trace)
    if rank_0():  # on a line of its own, above a progress bar
        tqdm.write("error: " + str(error).strip().splitlines()[-1].split("NoReadableImage: ")[-1],
                   file=sys.stderr)


sys.excepthook = one_line_for_unreadable_splits


class XrayDataset(Dataset):
    """(path, target) records; item (index, augmentation seed or None) -> (image, target, 'path
    (error)' lines of the unreadable images it stands in for: the caller reports them, once).
    `split` names the records in the error raised when none of them can be read."""

    def __init__(self, records, image_size, split="given", hflip=False, affine=True, cache="",
                 square="pad"):
        self.records, self.image_size, self.hflip, self.affine = records, image_size, hflip, affine
        self.split = split
        self.square = square
        require_pydicom(records)
        self.cache = usable_cache(cache)  # '' if that folder cannot be written

    @classmethod
    def as_trained(cls, records, run):  # the evaluation view of a cleft.py run's Config
        return cls(records, run.image_size, cache=run.image_cache, square=run.square)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        index, aug_seed = item
        # a tuple seed gives numpy an independent stream per (seed, epoch, image index)
        rng = np.random.default_rng(aug_seed) if aug_seed else None
        unreadable = []
        for offset in range(len(self)):  # unreadable: the next stands in, batches stay full
            path, target = self.records[(index + offset) % len(self)]
            try:
                image = load_image(path, self.image_size, rng, self.hflip, self.affine, self.cache,
                                   self.square)
                return image, drawn(target, aug_seed), "\n".join(unreadable)
            except (OSError, ValueError) as error:  # missing, truncated or corrupt
                unreadable.append(f"{path} ({error})")
        raise NoReadableImage(f"none of the {len(self)} {self.split} images can be read, e.g. "
                              f"{unreadable[0]}: check the paths (a data set's: --data-root).")


def drawn(target, aug_seed):
    """A target, or for a tuple of captions (a report's sentences or sections) the one drawn for
    this (seed, epoch, image): the same on any rank and in a resumed run; without a seed, all."""
    if not isinstance(target, tuple):
        return target
    if aug_seed is None:
        return " ".join(target)
    return target[np.random.default_rng((*aug_seed, 1)).integers(len(target))]  # not the view's


def overlay_map(view, patch_map):
    """The view (S, S), values in [0, 1], in gray with a map (h, w) of signed scores on it, one
    block per patch: red where it adds to the score, blue where it takes away, as strong as
    |value| / max |value| (predict.py's maps)."""
    signed = patch_map / max(float(np.abs(patch_map).max()), 1e-12)  # in [-1, 1]
    signed = np.asarray(Image.fromarray(signed.astype(np.float32)).resize(
        view.shape[::-1], Image.Resampling.NEAREST))  # a block per patch: the terms as they are
    color = np.where(signed[:, :, None] > 0, [1.0, 0.1, 0.1], [0.1, 0.3, 1.0])
    alpha = 0.6 * np.abs(signed)[:, :, None]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * view[:, :, None] + alpha * color)))
