"""predict's refusals of issue 19 that need no nnU-Net data: each exits 2 with the fix named and writes nothing."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("extra,message", [
    (["-n", "1"], "one model gives no spread"),
    (["-n", "3", "--temperature", "-2"], "a number above 0"),
    (["-n", "3", "--temperature", "warm"], "a number above 0"),
    (["-n", "3", "--failure-dice", "0"], "(0, 1]"),
])
def test_refused_before_anything_is_written(extra, message, tmp_path, capsys):
    from nnunet_varaug import cli

    out = tmp_path / "out"
    rc = cli.main(["predict", "-i", str(tmp_path), "-o", str(out), "-d", "999", "-c", "3d_fullres", "-f", "0",
                   *extra])
    assert rc == 2 and message in capsys.readouterr().err and not out.exists()
