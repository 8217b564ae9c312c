"""`prepare` gives one voxel order (LPS, as DICOM) whatever the input stored: the same anatomy as a
DICOM series, an LPS NRRD and a RAS NIfTI prepares to identical arrays and geometry."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from conftest import write_ct_series
from medsyn_site.config import DataConfig
from medsyn_site.data.prepare import prepare_case

SPACING = (0.8, 0.7, 2.0)  # x, y, z mm
ORIGIN = (-20.0, -15.0, 100.0)


def _anatomy():
    """(z, y, x) int16 HU with an asymmetric marker (patient's right-anterior-inferior corner)
    and a mask on a different asymmetric spot."""
    vol = np.full((12, 30, 36), -1000, np.int16)
    vol[:, 5:25, 4:32] = 40
    vol[1:3, 6:9, 5:9] = 1000
    mask = np.zeros(vol.shape, np.uint8)
    mask[8:11, 18:22, 24:29] = 1
    return vol, mask


def _lps(array, pixel):
    img = sitk.GetImageFromArray(array.astype(pixel))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def _ras(array, pixel):
    """The same anatomy stored in RAS voxel order: x and y indices reversed, the direction says so."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1, ::-1]).astype(pixel))
    img.SetSpacing(SPACING)
    n = array.shape[::-1]
    img.SetOrigin((ORIGIN[0] + (n[0] - 1) * SPACING[0], ORIGIN[1] + (n[1] - 1) * SPACING[1], ORIGIN[2]))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return img


def test_dicom_lps_nrrd_and_ras_nifti_prepare_alike(tmp_path):
    vol, mask = _anatomy()
    write_ct_series(tmp_path / "dicom", vol, SPACING, ORIGIN, (1, 0, 0), (0, 1, 0))
    sitk.WriteImage(_lps(mask, np.uint8), str(tmp_path / "dicom_mask.nrrd"))
    sitk.WriteImage(_lps(vol, np.int16), str(tmp_path / "lps.nrrd"))
    sitk.WriteImage(_lps(mask, np.uint8), str(tmp_path / "lps_mask.nrrd"))
    sitk.WriteImage(_ras(vol, np.int16), str(tmp_path / "ras.nii.gz"))
    sitk.WriteImage(_ras(mask, np.uint8), str(tmp_path / "ras_mask.nii.gz"))
    ras = sitk.ReadImage(str(tmp_path / "ras.nii.gz"))
    assert ras.GetDirection()[0] == -1 and ras.GetDirection()[4] == -1  # stored in RAS order indeed

    cfg = DataConfig(prepare={"spacing": (1.0, 1.0, 2.5)})
    out = {}
    for name, image, m in (("dicom", "dicom", "dicom_mask.nrrd"), ("nrrd", "lps.nrrd", "lps_mask.nrrd"),
                           ("nifti", "ras.nii.gz", "ras_mask.nii.gz")):
        img, msk, _, _ = prepare_case({"image": str(tmp_path / image), "mask": str(tmp_path / m), "patient": "p"}, cfg)
        out[name] = (img, msk)
    ref_img, ref_mask = out["dicom"]
    assert ref_img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)  # LPS voxel order
    assert np.allclose(ref_img.GetOrigin(), ORIGIN)
    for name, (img, msk) in out.items():
        assert img.GetSize() == ref_img.GetSize() and img.GetDirection() == ref_img.GetDirection(), name
        assert np.allclose(img.GetOrigin(), ref_img.GetOrigin(), atol=1e-3), (name, img.GetOrigin())
        assert np.allclose(img.GetSpacing(), ref_img.GetSpacing()), name
        np.testing.assert_allclose(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref_img), atol=1e-3,
                                   err_msg=name)
        assert np.array_equal(sitk.GetArrayFromImage(msk), sitk.GetArrayFromImage(ref_mask)), name
        assert msk.GetDirection() == img.GetDirection() and np.allclose(msk.GetOrigin(), img.GetOrigin())
    # the marker sits at the low x, y, z corner (right, anterior, inferior) in every prepared array
    arr = sitk.GetArrayFromImage(out["nifti"][0])
    z, y, x = np.argwhere(arr > 500).mean(0)
    assert z < arr.shape[0] / 3 and y < arr.shape[1] / 3 and x < arr.shape[2] / 3
