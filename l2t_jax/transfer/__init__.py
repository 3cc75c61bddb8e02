"""The method and its baselines as pure JAX: no files, no config.

- :mod:`~l2t_jax.transfer.methods`: the method table, one row per method (plain data);
- :mod:`~l2t_jax.transfer.terms`: the loss terms a method adds to the target's CE;
- :mod:`~l2t_jax.transfer.losses`: the loss functions they are made of;
- :mod:`~l2t_jax.transfer.pairing` and :mod:`~l2t_jax.transfer.pair_lists`: which source
  tap teaches which target tap;
- :mod:`~l2t_jax.transfer.heads`: the parts methods add to theta (1x1 regressors, LwF's
  head); :mod:`~l2t_jax.transfer.meta`: phi, the meta-networks (what and where);
- :mod:`~l2t_jax.transfer.afd` and :mod:`~l2t_jax.transfer.semckd`: two methods that learn
  where to transfer without meta-networks, each its authors' module (a part of theta) and
  its loss term;
- :mod:`~l2t_jax.transfer.bilevel`: the jit-compiled training iteration;
  :mod:`~l2t_jax.transfer.optim`: theta's SGD and learning-rate schedules.

Importing this package loads nothing (the configs read the JAX-free pair lists).
"""
