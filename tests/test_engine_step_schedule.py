"""trainer.scheduler=step: the late-phase SAM authors' step schedule, against their own rule
written out by hand (zzp1012/SAM-in-Late-Phase, src/utils/step_lr.py, StepLRforWRN)."""
from __future__ import annotations

import pytest

from esam.engine.schedule import lr_factor


def authors_wrn_factor(epoch: int, total_epochs: int) -> float:
    """StepLRforWRN's lr / base at a 0-based epoch: x1, x0.2 from 30%, x0.04 from 60% of the epochs."""
    if epoch < total_epochs * 3 / 10:
        return 1.0
    if epoch < total_epochs * 6 / 10:
        return 0.2
    return 0.2 ** 2


@pytest.mark.parametrize("epochs", [10, 200, 37])
def test_step_schedule_is_the_authors_wrn_schedule(epochs):
    spe = 3
    ours = [lr_factor(s, steps_per_epoch=spe, epochs=epochs, kind="step", milestones=(0.3, 0.6), step_gamma=0.2)
            for s in range(epochs * spe)]
    theirs = [authors_wrn_factor(s // spe, epochs) for s in range(epochs * spe)]
    assert ours == pytest.approx(theirs, rel=1e-15)


def test_late_phase_runs_at_four_hundredths_of_the_base_lr():
    """The SAM phase of late-phase SAM (epochs 175-199 of 200) is held at 0.04 x base, not cosine's ~0.0135."""
    f = [lr_factor(e * 2, steps_per_epoch=2, epochs=200, kind="step") for e in range(175, 200)]
    assert f == pytest.approx([0.04] * 25)


def test_step_schedule_per_step_and_after_warmup():
    # per step: the factor changes at the step where 30% of the run is done, not at the epoch boundary
    f = [lr_factor(s, steps_per_epoch=10, epochs=1, kind="step", per="step", milestones=(0.3,), step_gamma=0.1)
         for s in range(10)]
    assert f == pytest.approx([1.0] * 3 + [0.1] * 7)
    # warm-up comes first; milestones still count from the run's start
    g = [lr_factor(e, steps_per_epoch=1, epochs=10, warmup_epochs=2, kind="step", milestones=(0.5,), step_gamma=0.5)
         for e in range(10)]
    assert g == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("override,key", [("trainer.milestones=[0.6,0.3]", "trainer.milestones"),
                                          ("trainer.milestones=[0.3,1.5]", "trainer.milestones"),
                                          ("trainer.step_gamma=0", "trainer.step_gamma")])
def test_bad_step_schedule_fails_naming_the_key(compose_train, override, key):
    from esam.engine.build import check_trainer_config
    from esam.errors import UserError

    cfg = compose_train(["trainer.scheduler=step", override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        check_trainer_config(cfg.trainer)


def test_step_schedule_composes_from_the_command_line(compose_train):
    cfg = compose_train(["trainer.scheduler=step", "trainer.milestones=[0.5]", "trainer.step_gamma=0.1"])
    assert cfg.trainer.scheduler.value == "step"
    assert list(cfg.trainer.milestones) == [0.5] and cfg.trainer.step_gamma == 0.1
