"""analyze's refusals of issue 19, before anything is written (no nnU-Net data needed)."""
from __future__ import annotations

import types

import pytest

from nnunet_varaug.commands.analyze import analyze_experiment
from nnunet_varaug.utilities.errors import VarAugError

pytestmark = pytest.mark.unit

REGIONS = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2],
           "file_ending": ".nii.gz", "channel_names": {"0": "x"}}


def test_calibration_of_a_region_based_dataset_is_refused_and_writes_nothing(tmp_path):
    exp = types.SimpleNamespace(dataset="Dataset999_Regions", dataset_json=REGIONS, num_replicas=3)
    out = tmp_path / "report"
    with pytest.raises(VarAugError) as e:
        analyze_experiment([exp], output=str(out), calibrate=True)
    assert "region-based" in str(e.value) and "Leave out --calibration" in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("flag,value,message", [("--failure-dice", "1.5", "(0, 1]"), ("--min-volume", "-1", "0 or more"),
                                                ("--nsd-tolerance", "0", "above 0")])
def test_bad_review_flags_are_refused(flag, value, message, tmp_path, capsys):
    from nnunet_varaug import cli

    rc = cli.main(["analyze", "-d", "999", "-c", "3d_fullres", "-f", "0", "-n", "3", "-o", str(tmp_path / "o"),
                   flag, value])
    assert rc == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()
