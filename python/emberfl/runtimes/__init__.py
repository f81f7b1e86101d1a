"""The runtimes that run a round's clients: worker processes, threads, and what they share.

* :mod:`emberfl.runtimes.process` -- the process pool: persistent worker processes
  that run clients from memory-mapped package files
  (:class:`~emberfl.runtimes.process.trainer.ProcessPoolClientTrainer`);
* :mod:`emberfl.runtimes.thread` -- the thread pool
  (:class:`~emberfl.runtimes.thread.ThreadPoolClientTrainer`);
* :mod:`emberfl.runtimes.common` -- what both pools share (the optional attributes,
  the round counter, in-order delivery);
* :mod:`emberfl.runtimes.tasks` -- rounds and client tasks, and the files they run from;
* :mod:`emberfl.runtimes.cpus` -- the CPUs this process (or rank) may use.

They implement the interfaces of :mod:`emberfl.core`, which re-exports the pools.
"""
