"""DICOM read as a viewer shows it: the modality LUT (rescale), then the VOI LUT or the first stored
window, scaled to 8 bits, MONOCHROME1 inverted; the image's range when no window (or an empty one)
is stored; the first frame; colour as its luminance; found by its content, not its name; a file
that gives no image skipped with its reason; and one clear error when pydicom is missing. CI
installs pydicom, so there these tests never skip."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import image_io

if os.environ.get("CI"):
    import pydicom
else:
    pydicom = pytest.importorskip("pydicom", minversion="3.0",
                                  reason="pip install pydicom to run the DICOM tests")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid  # noqa: E402

# 12-bit CT-like values: stored s is s - 1024 Hounsfield units after the modality rescale
HU = np.array([-1024, -160, 40, 240, 3071, 0, -300, 500])  # lowest storable, window edges, ...
STORED = (HU + 1024).reshape(2, 4)


def write_dicom(path, stored=STORED, window=None, photometric="MONOCHROME2", lut=None,
                intercept=-1024, bits=12, palette=None, syntax=ExplicitVRLittleEndian):
    """stored: (rows, columns), (frames, rows, columns), or (rows, columns, 3) for RGB. window:
    (centre, width), None for an element left out, '' for one left empty. palette: (3, n) table
    entries of 16 bits. A compressed syntax frames the bytes as it, without compressing them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    dicom = Dataset()
    dicom.file_meta = meta
    dicom.SOPClassUID = meta.MediaStorageSOPClassUID
    dicom.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    rgb = photometric == "RGB"
    dicom.Rows, dicom.Columns = stored.shape[:2] if rgb else stored.shape[-2:]
    if stored.ndim == 3 and not rgb:
        dicom.NumberOfFrames = len(stored)
    dicom.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        dicom.PlanarConfiguration = 0  # each pixel's R, G, B together
    dicom.PhotometricInterpretation = photometric
    dicom.BitsAllocated = 8 if bits <= 8 else 16
    dicom.BitsStored = bits
    dicom.HighBit = bits - 1
    dicom.PixelRepresentation = 0  # unsigned
    dicom.RescaleSlope = 1
    dicom.RescaleIntercept = intercept
    for keyword, value in zip(["WindowCenter", "WindowWidth"], window or []):
        if value is not None:
            setattr(dicom, keyword, value)
    if lut is not None:  # a VOI LUT sequence from input 0, 16-bit table entries
        item = Dataset()
        item.LUTDescriptor = [len(lut), 0, 16]
        item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
        dicom.VOILUTSequence = [item]
    if palette is not None:  # from stored value 0, 16-bit table entries
        for color, table in zip(["Red", "Green", "Blue"], palette):
            setattr(dicom, f"{color}PaletteColorLookupTableDescriptor", [len(table), 0, 16])
            dicom.add_new(f"{color}PaletteColorLookupTableData", "OW",
                          table.astype("<u2").tobytes())
    dicom.PixelData = stored.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    if syntax.is_compressed:
        dicom.PixelData = encapsulate([dicom.PixelData])
    dicom.save_as(path, enforce_file_format=True)
    return str(path)


def linear_window(hu, center, width):  # DICOM's LINEAR window function, output in [0, 1]
    return np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_the_stored_window_is_applied_after_the_rescale(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", window=(40, 400))
    pixels = image_io.dicom_pixels(path).ravel()
    np.testing.assert_allclose(pixels, linear_window(HU, 40, 400), atol=1e-9)
    assert pixels[2] == pytest.approx(0.5, abs=0.002)  # the window's centre, 40 HU, is mid-gray
    assert pixels[1] == 0 and pixels[3] == 1  # its edges are black and white
    # 8 bits: the centre reads 128 (scaling the stored values by their maximum gave 0.26 of 255)
    image = np.asarray(image_io.decode_xray(path, 2)).ravel()  # 2: not reduced
    assert image.dtype == np.uint8 and image[2] == 128 and image[1] == 0 and image[3] == 255


def test_without_a_window_the_image_range_is_used(tmp_path):
    pixels = image_io.dicom_pixels(write_dicom(tmp_path / "a.dcm")).ravel()
    np.testing.assert_allclose(pixels, (HU - HU.min()) / (HU.max() - HU.min()), atol=1e-9)


@pytest.mark.parametrize("window", [(40, 400), None])
def test_monochrome1_is_inverted(tmp_path, window):
    plain = image_io.dicom_pixels(write_dicom(tmp_path / "2.dcm", window=window))
    inverted = image_io.dicom_pixels(write_dicom(tmp_path / "1.dcm", window=window,
                                                 photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1 - plain, atol=1e-9)
    assert inverted.ravel()[0] == 1  # the lowest value is white in MONOCHROME1


def test_a_voi_lut_sequence_comes_before_the_window(tmp_path):
    lut = (np.arange(4096) ** 2 // 256).astype(np.uint16)  # a curve, not a window: 0 to 65504
    path = write_dicom(tmp_path / "a.dcm", window=(40, 400), lut=lut, intercept=0)
    pixels = image_io.dicom_pixels(path).ravel()  # the table's output range is its two ends
    np.testing.assert_allclose(pixels, lut[STORED.ravel()] / lut[-1], atol=1e-9)


@pytest.mark.parametrize("window", [("", 400), (40, None)])  # empty centre; centre, no width
def test_an_empty_or_incomplete_window_falls_back_to_the_image_range(tmp_path, window):
    stored = STORED[:, 1:]  # -300 to 500 HU, not the storable range (that read as a flat gray)
    hu = stored - 1024
    pixels = image_io.dicom_pixels(write_dicom(tmp_path / "a.dcm", stored, window=window))
    np.testing.assert_allclose(pixels, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-9)


def test_an_empty_rescale_reads_as_none(tmp_path):  # pydicom would multiply by None
    stored = STORED[:, 1:]
    pixels = image_io.dicom_pixels(write_dicom(tmp_path / "a.dcm", stored, intercept=""))
    np.testing.assert_allclose(pixels, (stored - stored.min()) / (stored.max() - stored.min()),
                               atol=1e-9)


def test_the_first_frame_of_a_multi_frame_dicom_is_read(tmp_path):
    two_frames = write_dicom(tmp_path / "two.dcm", stored=np.stack([STORED, 4095 - STORED]),
                             window=(40, 400))
    first = write_dicom(tmp_path / "first.dcm", window=(40, 400))
    np.testing.assert_array_equal(image_io.dicom_pixels(two_frames),
                                  image_io.dicom_pixels(first))
    image = np.asarray(image_io.decode_xray(two_frames, 2))
    assert image.shape == (2, 4) and image.ravel()[2] == 128  # 40 HU: the window's centre


def test_a_dicom_is_recognised_by_its_content_not_its_name(tmp_path):
    named = write_dicom(tmp_path / "a.dcm", window=(40, 400))
    nameless = tmp_path / "IM0001"  # as in a DICOMDIR export
    nameless.write_bytes(Path(named).read_bytes())
    np.testing.assert_array_equal(np.asarray(image_io.decode_xray(nameless, 2)),
                                  np.asarray(image_io.decode_xray(named, 2)))
    image, target, unreadable = image_io.XrayDataset([(str(nameless), 0)], 32)[0, None]
    assert image.shape == (1, 32, 32) and unreadable == ""


def test_colour_dicoms_are_read_as_their_luminance(tmp_path):
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    rgb = write_dicom(tmp_path / "rgb.dcm", stored=colors.reshape(2, 2, 3), photometric="RGB",
                      bits=8)
    tables = 257 * colors.T.astype(np.uint16)  # 16-bit entries: 255 becomes 65535
    palette = write_dicom(tmp_path / "palette.dcm", stored=np.array([[0, 1], [2, 3]]),
                          photometric="PALETTE COLOR", bits=8, palette=tables)
    luminance = [0.299, 0.587, 0.114, 1]  # ITU-R BT.601: red, green, blue, white
    np.testing.assert_allclose(image_io.dicom_pixels(rgb).ravel(), luminance, atol=1e-9)
    np.testing.assert_allclose(image_io.dicom_pixels(palette).ravel(), luminance, atol=1e-9)
    as_pil = Image.fromarray(colors.reshape(2, 2, 3)).convert("L")  # 8 bits as PIL makes them
    for path in [rgb, palette]:
        np.testing.assert_array_equal(np.asarray(image_io.decode_xray(path, 2)), as_pil)


def test_unreadable_dicoms_are_skipped_with_their_reason(tmp_path):
    good = write_dicom(tmp_path / "good.dcm")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).bytes(1000))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(good).read_bytes()[:-5])  # cut in the pixel data
    no_pixels = tmp_path / "no_pixels.dcm"  # as a report or a DICOMDIR index is
    header = pydicom.dcmread(good)
    del header.PixelData
    header.save_as(no_pixels)
    jpeg_ls = write_dicom(tmp_path / "jpeg_ls.dcm", syntax=JPEGLSLossless)  # no decoder here
    bad = [str(path) for path in [empty, noise, truncated, no_pixels, jpeg_ls]]
    dataset = image_io.XrayDataset([(path, "bad") for path in bad] + [(good, "good")], 32)
    image, target, unreadable = dataset[0, None]
    assert target == "good" and image.shape == (1, 32, 32)  # the next readable one stands in
    reasons = dict(line.split(" (", 1) for line in unreadable.splitlines())  # one line each
    assert list(reasons) == bad
    assert "without pixel data" in reasons[str(no_pixels)]
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in reasons[jpeg_ls]


def test_a_missing_pydicom_is_one_clear_error(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a.dcm")
    monkeypatch.setitem(sys.modules, "pydicom.pixels", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install 'pydicom>=3'"):
        image_io.XrayDataset([(path, 0)], 32)
    nameless = tmp_path / "IM0001"  # a DICOM by its content: pydicom is needed at its reading
    nameless.write_bytes(Path(path).read_bytes())
    with pytest.raises(image_io.NoReadableImage, match=r"pip install 'pydicom>=3'"):
        image_io.XrayDataset([(str(nameless), 0)], 32)[0, None]
    monkeypatch.undo()
    image, target, unreadable = image_io.XrayDataset([(path, 0)], 32)[0, None]
    assert image.shape == (1, 32, 32) and target == 0 and unreadable == ""
