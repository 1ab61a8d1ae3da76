"""Input checks before anything is written (nnunet_varaug.inference.cases): unreadable files refused with the file
named, labels checked against their image's grid (size, spacing, origin, direction)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_varaug.inference.cases import Case, check_grids
from nnunet_varaug.utilities.errors import VarAugError

pytestmark = pytest.mark.unit


def write(path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
          size=(6, 5, 4)):
    img = sitk.GetImageFromArray(np.zeros(size[::-1], np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


@pytest.mark.parametrize("change,what", [({}, None), ({"size": (6, 5, 5)}, "size"),
                                         ({"spacing": (1.0, 1.0, 2.5)}, "spacing"),
                                         ({"origin": (0.0, 3.0, 0.0)}, "origin"),
                                         ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}, "direction"),
                                         ({"origin": (0.0, 0.0, 1e-7)}, None)])
def test_label_must_share_the_image_grid(tmp_path, change, what):
    image = write(tmp_path / "c_0000.nii.gz")
    label = write(tmp_path / "c.nii.gz", **change)
    if what is None:
        check_grids([Case("c", [image], label)])
        return
    with pytest.raises(VarAugError) as e:
        check_grids([Case("c", [image], label)])
    assert what in str(e.value) and "not the label of c" in str(e.value) and "Fix -l" in str(e.value)


def test_unreadable_image_is_refused_with_the_file_named(tmp_path):
    image = tmp_path / "case_0000.nii.gz"
    image.write_text("this is not an image\n")
    with pytest.raises(VarAugError) as e:
        check_grids([Case("case", [str(image)])])
    assert str(image) in str(e.value) and "not a readable image" in str(e.value)
    assert "Traceback" not in str(e.value)
