"""The runtime: one run from its config to ``result.json``.

:mod:`~l2t_jax.training.config` holds the config's keys, checks and the one reader of a
run's ``config.json``; :mod:`~l2t_jax.training.build` turns a config into networks, the
transfer, the source's weights, the data splits and the schedule;
:mod:`~l2t_jax.training.train` runs the loop
(:func:`~l2t_jax.training.train.train_and_evaluate`), with evaluation
(:mod:`~l2t_jax.training.evaluation`), the result record and what phi learned
(:mod:`~l2t_jax.training.results`), stopping on a signal (:mod:`~l2t_jax.training.stopping`),
checkpoints (:mod:`~l2t_jax.training.checkpoints`), the workdir's files
(:mod:`~l2t_jax.training.workdir`), devices and hosts (:mod:`~l2t_jax.training.parallel`),
what a run prints (:mod:`~l2t_jax.training.logs`) and where a result came from
(:mod:`~l2t_jax.training.provenance`), the compilation cache, the authors' released files
(:mod:`~l2t_jax.training.assets`) and converted networks
(:mod:`~l2t_jax.training.converted`).

Importing this package loads nothing: the JAX-free modules (workdir, logs) stay light.
"""
