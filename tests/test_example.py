"""examples/minimal_esam.py, the file the README sends a newcomer to first, runs and learns."""
from __future__ import annotations

import importlib.util

from helpers import REPO


def test_minimal_example_trains_esam(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("minimal_esam", REPO / "examples" / "minimal_esam.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "EPOCHS", 2)
    example.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["1", "2"] and lines[-1].startswith("final test loss")
    acc = float(lines[1].split("test acc")[1].split("%")[0])
    assert acc > 50.0  # chance is 10%: two epochs of ESAM on digits learn
    assert "samples in 2nd pass 0.4" in lines[0]  # SDS kept about gamma = 0.5 of each batch
