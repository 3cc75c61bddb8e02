"""Experiment tooling above the library: the grid runner, the digits tasks, the offline demo
and study (and its report), the paper's tables and numbers, summaries, pictures (what and
where was transferred: ``weight_plots``; curves, the limited-data plot, confusion matrices:
``metric_plots``; what they share: ``figures``; the command line: ``plots``) and
benchmarks. Nothing below (models, transfer, data, training) imports these; the entry
point reaches the demo and the study by name.

Command lines: ``python -m l2t_jax.tools.plots``, ``python -m l2t_jax.tools.bench``,
``python -m l2t_jax.tools.bench_pipeline``, ``python -m l2t_jax.tools.step_cost``.
"""
