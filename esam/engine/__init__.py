"""The training engine: build a run, drive its steps, checkpoint, resume, write its files.

    build.py       build_run(cfg, run_dir) -> Run: device, precision, data, model, optimizer, schedule
    schedule.py    the lr schedule and the run's planned length (pure functions)
    checkpoint.py  checkpoint state, the same-run check, what trainer.resume means
    signals.py     SIGTERM / SIGUSR1 / Ctrl-C -> a flag; chaining to the previous handler
    monitor.py     device-side epoch sums, the step timer, the non-finite-loss watch
    run_files.py   metrics.jsonl, summary.json, console lines
    trainer.py     Trainer: the loop, evaluation and fit
"""
from esam.engine.build import Run, build_run  # noqa: F401
from esam.engine.signals import STOP_SIGNALS  # noqa: F401
from esam.engine.trainer import NonFiniteLossError, Trainer  # noqa: F401
