"""What a new user trips over on a first read and a first run; each check once failed."""
from __future__ import annotations

import pytest

from helpers import run_cli


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_a_misspelt_optimizer_key_added_with_plus_is_one_sentence_naming_it(tmp_path):
    # Hydra's own hint for an unknown key is `+key=value`; that must not end in a TypeError traceback.
    res = run_cli(["optimizer=sam", "+optimizer.rhoo=0.1", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: +optimizer.rhoo adds optimizer.rhoo, which no setting reads; "
                              "did you mean optimizer.rho?")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # a failed run leaves no empty run folder


def test_demo_table_can_hold_any_registered_methods(tmp_path, capsys):
    import pytest

    from esam.demo import demo, format_table
    from esam.errors import UserError

    summaries = demo(["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.precision=fp32",
                      "trainer.num_threads=1"], tmp_path, methods=("sgd", "looksam"))
    table = format_table(summaries)
    assert [s["optimizer"] for s in summaries] == ["sgd", "looksam"]
    assert "| SGD |" in table and "| LOOKSAM |" in table
    with pytest.raises(UserError, match="unknown method 'lookasm'"):
        demo([], tmp_path, methods=("lookasm",))


def test_installing_prints_no_setuptools_warnings(monkeypatch):
    """`make install` once printed ~40 lines of deprecation warnings about pyproject's `license`:
    the configuration setuptools reads (>= 77, as the build requires) warns of nothing."""
    import warnings

    import pytest

    from helpers import REPO

    pytest.importorskip("setuptools", minversion="77")  # older ones cannot read an SPDX license
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # readme = "README.md" is found from there, as a build finds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message) for w in caught] == []
