"""`make demo` in CI: the whole story (train, graft with freeze, stop, extend by resume, plot)
through the real launcher, asserting an accuracy far above chance."""

from __future__ import annotations

import re
import sys

import pytest
from launch import REPO, run
from launch import child_env

pytestmark = pytest.mark.e2e


def test_demo_quick(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    proc = run([sys.executable, str(REPO / "examples" / "demo.py"), "--quick", "--out", str(out)],
               timeout=900, env=child_env())
    text = proc.stdout
    # the launcher printed what it ran, for the first run and for the resume
    assert re.search(r"^\$ .*accelerate.* launch .*-m graft\.train --config configs/digits_base\.yaml", text, re.M)
    assert re.search(r"^\$ .*-m graft\.train --config \S+/graft/config\.yaml --resume auto .*train\.epochs=4", text, re.M)
    # the dry-run plan and the load report, with the new parts and the frozen ones
    assert "rnn3.0.weight" in text and "excluded by 'classifier.6.*'" in text
    assert re.search(r"frozen\s+20", text)
    assert "trainable: 734 of" in text
    m = re.search(r"extended to 4 epochs \(resumed, LR stretch\)\s+([\d.]+)%", text)
    assert m, text[-3000:]
    assert float(m.group(1)) > 50.0, f"final accuracy {m.group(1)}% is not well above chance (10%)"
    assert "OK: final accuracy" in text
    png = out / "graft_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written: {png}" in text
