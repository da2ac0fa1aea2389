"""Side-by-side overhead benchmark: SGD, SAM, ESAM and every registered method, in one process, interleaved.

    python -m esam.bench                                   # resnet18, 128 x 3x32x32, precision auto, 5 methods
    python -m esam.bench precision=fp32 repeats=14
    python -m esam.bench '+variants.esam_b04={optimizer:esam,beta:0.4}' 'methods=[sgd,esam,esam_b04]'
    python -m esam.bench mode=grid grid.betas=[0.4,0.6,0.8,1.0] grid.gammas=[0.3,0.5,0.7,1.0] steps=1 repeats=10
    python -m esam.bench publish=true                      # write into results/bench/ (default: the run folder)

Every method gets its own copy of the same initial model and its own optimizer (composed from
``conf/optimizer/<name>.yaml``, see :mod:`esam.bench.methods`), and all see the same batches
(made once, kept on the device). Methods take turns in blocks of ``steps`` steps, ``repeats``
times (the order rotates each repeat), so drift of the machine (clock, temperature, other load)
hits all of them alike. Every pass tells the optimizers where in training its steps are
(``opt.set_progress`` over ``window``), so methods that decide per step are timed over a
realistic mix. On Linux, blocks during which other processes used more than
``max_foreign_cpu`` of the machine are left out (``blocks_used`` says how many stayed).

Cost model (forward = 1 unit, backward = 2 units), read from the method registry
(``esam.optim.get_method(name).expected_cost(**hparams)``) and set beside the mean
``opt.last_cost`` the timed steps reported: SGD 3, SAM 6, ESAM(0.6, 0.5) 5.1 (+70 %).

Rooms: ``methods`` (which methods, from the optimizer config group), ``measure`` (timers, the
interleaved runner, FLOP counting, per-phase segments), ``tables``, ``plots``, ``runner``
(files and provenance), ``pipeline`` (the trainer vs the bench's SGD steps), ``__main__``.
"""
from esam.bench.measure import Bench, ForeignCPU, Method, Segments
from esam.bench.methods import MethodSpec, method_specs, registered_options
from esam.bench.runner import PUBLISH_DIR, output_dir, run
from esam.bench.tables import bench_rows, markdown, report_tables

__all__ = ["Bench", "ForeignCPU", "Method", "Segments", "MethodSpec", "method_specs", "registered_options",
           "PUBLISH_DIR", "output_dir", "run", "bench_rows", "markdown", "report_tables"]
