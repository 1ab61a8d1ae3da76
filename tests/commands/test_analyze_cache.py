"""analyze's prediction cache: which cached predictions a rerun keeps (no nnU-Net data needed)."""
import types

import pytest

from nnunet_varaug.inference.cache import FINGERPRINT, image_hashes, prediction_state
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.utilities.fileio import write_json

pytestmark = pytest.mark.unit


def setup(tmp_path):
    checkpoint = tmp_path / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights")
    exp = types.SimpleNamespace(final_checkpoint=lambda name: str(checkpoint))
    folder = tmp_path / "predictions" / "R_seed0"
    folder.mkdir(parents=True)
    image = tmp_path / "case_0000.nii.gz"
    image.write_bytes(b"image one")
    (folder / "case.nii.gz").write_bytes(b"")
    return exp, folder, image


def record(exp, folder, cases, **settings):
    identity, rec, todo = prediction_state(exp, "R_seed0", str(folder), cases, ".nii.gz", **settings)
    for c in todo:
        rec["cases"][c.name] = image_hashes([c])[c.name]
    write_json(str(folder / FINGERPRINT), rec)
    return identity, [c.name for c in todo]


def test_predictions_made_with_the_other_tta_setting_or_step_size_are_predicted_again(tmp_path):
    """A case predicted with mirroring TTA is reused with TTA, predicted again without it (and the other way
    round), and the identity that ties the mean probabilities to the predictions differs between the two; the
    same for the step size."""
    exp, folder, image = setup(tmp_path)
    cases = [Case("case", [str(image)])]
    with_tta, todo = record(exp, folder, cases, tta=True)
    assert todo == ["case"]  # nothing recorded yet
    again, todo = record(exp, folder, cases, tta=True)
    assert todo == [] and again == with_tta
    without, todo = record(exp, folder, cases, tta=False)
    assert todo == ["case"] and without != with_tta
    other_step, todo = record(exp, folder, cases, tta=False, step_size=0.75)
    assert todo == ["case"] and other_step not in (with_tta, without)


def test_the_cache_is_keyed_by_image_content_not_path(tmp_path):
    exp, folder, image = setup(tmp_path)
    cases = [Case("case", [str(image)])]
    record(exp, folder, cases)
    image.write_bytes(b"image two")  # replaced under the same name: predicted again
    assert record(exp, folder, cases)[1] == ["case"]
    moved = tmp_path / "elsewhere_0000.nii.gz"
    image.rename(moved)  # the same content under another path: kept
    assert record(exp, folder, [Case("case", [str(moved)])])[1] == []
