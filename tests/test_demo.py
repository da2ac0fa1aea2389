"""esam.demo's command line: --help and the docstring's `--methods looksam` form, one sentence for a
bad setting, SGD always in the table (compute vs SGD needs it), and the table's footnotes."""
from __future__ import annotations

import pytest
from hydra import initialize_config_dir

from esam import demo
from esam.train import CONFIG_DIR

TINY = ["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.timing_warmup_steps=1", "trainer.precision=fp32",
        "trainer.num_threads=1"]


def test_help_is_argparse_usage_not_a_hydra_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    out = capsys.readouterr()
    assert exit_.value.code == 0 and out.err == ""
    assert out.out.startswith("usage: python -m esam.demo [-h] [--methods M1,M2,...] [settings ...]")
    assert "sgd is added where missing" in out.out and "looksam" in out.out


@pytest.mark.parametrize("argv,methods,overrides,added", [
    (["--methods", "looksam"], ("sgd", "looksam"), [], True),                      # the docstring's form
    (["--methods=looksam,msam", "trainer.epochs=2"], ("sgd", "looksam", "msam"), ["trainer.epochs=2"], True),  # make's
    (["trainer.epochs=2", "--methods", "sam,sgd", "seed=1"], ("sam", "sgd"), ["trainer.epochs=2", "seed=1"], False),
    ([], ("sgd", "sam", "esam"), [], False),
])
def test_methods_and_settings_parse_with_sgd_always_in(argv, methods, overrides, added):
    got_methods, got_overrides, note = demo.parse_args(argv)
    assert (got_methods, got_overrides) == (methods, overrides)
    assert note == ("note: running sgd too: 'compute vs SGD' is each method's time per image over SGD's" if added
                    else None)


@pytest.mark.parametrize("argv,sentence", [
    (["trainer.epoch=2"], "error: trainer.epoch is not a setting; did you mean trainer.epochs? "
                          "(python -m esam.train --cfg job prints them all)"),
    (["--methods", "sam", "optimizer.rhoo=0.1"], "error: optimizer.rhoo is not a setting; did you mean optimizer.rho? "
                                                 "(python -m esam.train --cfg job prints them all)"),
    (["trainer.epochs=abc"], "error: trainer.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["dataset=cifar11"], "error: Could not find 'dataset/cifar11'; available: cifar10, cifar100, digits, "
                          "digits_noisy, imagenet, mnist1d, synthetic"),
    (["--methods", "lookasm"], "error: unknown method 'lookasm'; allowed: aesam, esam, gsam, ksam, latesam, looksam, "
                               "mesa, msam, rst, saf, sam, sgd"),
])
def test_a_bad_setting_is_one_sentence_before_any_training(argv, sentence, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        demo.main(argv)
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.err.strip().splitlines() == [sentence]
    assert "---" not in out.out and not (tmp_path / "outputs").exists()  # nothing trained


def test_a_methods_own_setting_goes_only_to_the_methods_that_have_it():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        runs, notes = demo.per_method(("sgd", "sam", "esam"), ["optimizer.rho=0.1", "seed=2", "optimizer.lr=0.1"])
    assert runs == {"sgd": ["seed=2", "optimizer.lr=0.1"], "sam": ["optimizer.rho=0.1", "seed=2", "optimizer.lr=0.1"],
                    "esam": ["optimizer.rho=0.1", "seed=2", "optimizer.lr=0.1"]}
    assert notes == ["note: optimizer.rho applies to sam, esam only (the others have no such setting)"]


def test_demo_of_one_method_runs_sgd_too_and_prints_the_reports_footnotes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo.main(["--methods", "looksam", *TINY])
    out = capsys.readouterr().out
    assert out.startswith("note: running sgd too")
    rows = [line for line in out.splitlines() if line.startswith("| demo |")]
    assert [r.split(" | ")[4] for r in rows] == ["SGD", "LOOKSAM"]
    compute_vs_sgd = [r.split(" | ")[12] for r in rows]
    assert compute_vs_sgd[0] == "100%" and compute_vs_sgd[1].endswith("%")  # filled, not blank
    assert "- compute vs SGD: time per image / SGD's time per image" in out
    assert "- compute (SGD-epochs): what the optimizer ran" in out
    assert sorted(p.name for p in (tmp_path / "outputs" / "demo").glob("*/*")) == ["looksam", "sgd"]
