"""analyze's prediction cache: which cached predictions a rerun keeps (no nnU-Net data needed)."""
import types

import pytest

from nnunet_varaug.inference.cache import FINGERPRINT, prediction_state
from nnunet_varaug.inference.cases import Case
from nnunet_varaug.utilities.fileio import write_json

pytestmark = pytest.mark.unit


def test_predictions_made_with_the_other_tta_setting_are_predicted_again(tmp_path):
    """A case predicted with mirroring TTA is reused with TTA, predicted again without it (and the other way
    round), and the identity that ties the mean probabilities to the predictions differs between the two."""
    checkpoint = tmp_path / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights")
    exp = types.SimpleNamespace(final_checkpoint=lambda name: str(checkpoint))
    folder = tmp_path / "predictions" / "R_seed0"
    folder.mkdir(parents=True)
    image = tmp_path / "case_0000.nii.gz"
    image.write_bytes(b"")
    (folder / "case.nii.gz").write_bytes(b"")
    cases = [Case("case", [str(image)])]
    with_tta, record, todo = prediction_state(exp, "R_seed0", str(folder), cases, ".nii.gz", tta=True)
    assert [c.name for c in todo] == ["case"]  # nothing recorded yet
    record["cases"]["case"] = [str(image)]
    write_json(str(folder / FINGERPRINT), record)

    again, _, todo = prediction_state(exp, "R_seed0", str(folder), cases, ".nii.gz", tta=True)
    assert todo == [] and again == with_tta
    without, _, todo = prediction_state(exp, "R_seed0", str(folder), cases, ".nii.gz", tta=False)
    assert [c.name for c in todo] == ["case"] and without != with_tta
