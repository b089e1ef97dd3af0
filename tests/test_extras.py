"""The core install scores without the `report` extra; commands that need it say so at once."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

BLOCK = "import sys; sys.modules.update(matplotlib=None, sklearn=None)\n"


def test_scoring_with_heatmaps_needs_no_report_extra():
    code = BLOCK + (
        "import numpy as np, cxrscreen\n"
        "from cxrscreen.cam import captioned, overlay\n"
        "img = (np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)\n"
        "df = cxrscreen.Screener(cam='gradcam', device='cpu')([img, img])\n"
        "assert df.height == 2 and df['status'].to_list() == ['ok', 'ok'] and df['cam_png'].null_count() == 0\n"
        "assert captioned(overlay(img, np.linspace(0, 1, 96 * 96).reshape(96, 96)), 'x').shape[0] > 96\n"
        "print('scored')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "scored" in res.stdout, res.stderr[-2000:]


def test_commands_that_need_the_report_extra_fail_in_one_line(tmp_path, monkeypatch):
    from cxrscreen.cli import main
    from cxrscreen.extras import require

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"pip install 'cxrscreen\[report\]'"):
        require("sklearn.cluster")
    for args in (["evaluate", "cxrscreen/weights/cxrnet-4class"], ["report", "cxrscreen/weights/cxrnet-4class",
                                                                     "-o", str(tmp_path / "r")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "cxrscreen[report]" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "r").exists()


def test_jet_runs_blue_to_red():
    import numpy as np

    from cxrscreen.cam import jet

    c = jet(np.array([0.0, 0.5, 1.0]))
    assert c[0].argmax() == 2 and c[2].argmax() == 0 and c[1][1] == 1.0  # blue, green-yellow middle, red
    assert c.min() >= 0 and c.max() <= 1
