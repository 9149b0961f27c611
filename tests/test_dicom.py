"""DICOM read as a viewer shows it: the modality LUT (rescale), then the VOI LUT or the first stored
window, scaled to 8 bits, MONOCHROME1 inverted; the image's range when no window is stored; and one
clear error when pydicom is missing. CI installs pydicom, so there these tests never skip."""

import os
import sys

import numpy as np
import pytest

import image_io

if os.environ.get("CI"):
    import pydicom
else:
    pydicom = pytest.importorskip("pydicom", minversion="3.0",
                                  reason="pip install pydicom to run the DICOM tests")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

# 12-bit CT-like values: stored s is s - 1024 Hounsfield units after the modality rescale
HU = np.array([-1024, -160, 40, 240, 3071, 0, -300, 500])  # lowest storable, window edges, ...
STORED = (HU + 1024).reshape(2, 4)


def write_dicom(path, stored=STORED, window=None, photometric="MONOCHROME2", lut=None,
                intercept=-1024):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicom = Dataset()
    dicom.file_meta = meta
    dicom.SOPClassUID = meta.MediaStorageSOPClassUID
    dicom.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dicom.Rows, dicom.Columns = stored.shape
    dicom.SamplesPerPixel = 1
    dicom.PhotometricInterpretation = photometric
    dicom.BitsAllocated = 16
    dicom.BitsStored = 12
    dicom.HighBit = 11
    dicom.PixelRepresentation = 0  # unsigned
    dicom.RescaleSlope = 1
    dicom.RescaleIntercept = intercept
    if window:
        dicom.WindowCenter, dicom.WindowWidth = window
    if lut is not None:  # a VOI LUT sequence from input 0, 16-bit table entries
        item = Dataset()
        item.LUTDescriptor = [len(lut), 0, 16]
        item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
        dicom.VOILUTSequence = [item]
    dicom.PixelData = stored.astype(np.uint16).tobytes()
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


def test_a_missing_pydicom_is_one_clear_error(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a.dcm")
    monkeypatch.setitem(sys.modules, "pydicom.pixels", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install 'pydicom>=3'"):
        image_io.XrayDataset([(path, 0)], 32)
    monkeypatch.undo()
    image, target, unreadable = image_io.XrayDataset([(path, 0)], 32)[0, None]
    assert image.shape == (1, 32, 32) and target == 0 and unreadable == ""
