"""The process pool: clients run in persistent worker processes, through mapped files.

* :mod:`emberfl.runtimes.process.trainer` -- the protocol user trainers subclass,
  :class:`~emberfl.runtimes.process.trainer.ProcessPoolClientTrainer`;
* :mod:`emberfl.runtimes.process.workers` -- what a trainer owns (worker pool, share
  directory) and the attributes that shape its workers;
* :mod:`emberfl.runtimes.process.pool` -- the worker processes and one round's run.
"""
