"""A simulation spread over the ranks of a torch.distributed job (torchrun).

* :mod:`emberfl.distributed.trainer` -- runs one round's clients over every rank, with
  each rank's own client trainer
  (:class:`~emberfl.distributed.trainer.DistributedClientTrainer`);
* :mod:`emberfl.distributed.collectives` -- what crosses the network: client
  assignment, the model broadcast, the tree of exact sums, gathered stand-ins;
* :mod:`emberfl.distributed.rank_watch` -- heartbeats and meetings in the job's store,
  which name a dead or silent rank instead of waiting on it;
* :mod:`emberfl.distributed.peer_codec` -- decoding what another rank sent, without
  running any code it could forge;
* :mod:`emberfl.distributed.cluster` -- this process's place in a torchrun job, and the
  checks before the first round.
"""
