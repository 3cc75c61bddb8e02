"""Pictures of training workdirs, the command line:

    python -m l2t_jax.tools.plots --workdir=DIR [--out=DIR] [--compare=LABEL=DIR[,DIR...] ...]

:func:`plot_workdir` writes every picture a workdir's files allow: its learning curves, and
for methods that learn where or what to transfer the pair-weight (or attention) heat map
and the channel weights; ``--compare`` adds the learning curves and the "where" heat maps
of several runs side by side. The pictures are made by :mod:`l2t_jax.tools.weight_plots`
(where and what was transferred) and :mod:`l2t_jax.tools.metric_plots` (learning curves,
train metrics, the limited-data plot, confusion matrices); what those share is in
:mod:`l2t_jax.tools.figures`.

Files are read through :mod:`l2t_jax.training.workdir`. Missing or malformed files raise
FileNotFoundError / ValueError naming the file; the command line prints them and exits.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from l2t_jax.tools import figures, metric_plots, weight_plots
from l2t_jax.transfer import methods
from l2t_jax.training import workdir as wd  # `workdir` is an argument here


def _workdir_method(workdir: str) -> str | None:
    """The run's method from result.json or config.json, None if neither says."""
    for name in (wd.RESULT, wd.CONFIG):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            content = wd.read_json(path)
            if isinstance(content, dict) and content.get("method"):
                return content["method"]
    return None


def _workdir_label(workdir: str) -> str:
    """Row label (``L2T-ww (all-to-all)``) of a workdir, or its directory name."""
    for name in (wd.RESULT, wd.CONFIG):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            content = wd.read_json(path)
            if isinstance(content, dict) and content.get("method"):
                return methods.row_label(content["method"],
                                         content.get("scheme", content.get("pairs")))
    return os.path.basename(os.path.normpath(workdir))


# ----------------------------------------------------------------------- one workdir
def plot_workdir(workdir: str, out_dir: str) -> list[str]:
    """Writes every picture the workdir's files allow into ``out_dir``:
    ``learning_curves.png`` always (metrics.jsonl is required); for methods that learn
    where to transfer, the heat map of
    :func:`l2t_jax.tools.weight_plots.plot_pair_weights` (needs
    transfer_weights.json): ``pair_weights.png`` for L2T-ww's lambda,
    ``pair_attention.png`` for AFD's and SemCKD's attention; and for methods with
    meta-networks (L2T-w, L2T-ww) ``channel_weights.png`` (channel weights or their
    entropy). Skipped pictures are noted on stdout. Returns the paths written."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} is not a directory")
    metrics_path = os.path.join(workdir, wd.METRICS)
    records = wd.read_metrics(metrics_path)   # raises, naming the file, when missing
    written = [metric_plots.plot_learning_curves({_workdir_label(workdir): workdir},
                                                 os.path.join(out_dir, "learning_curves.png"))]
    method = _workdir_method(workdir)
    weights_path = os.path.join(workdir, wd.TRANSFER_WEIGHTS)
    has_weights_file = os.path.isfile(weights_path)
    if (method is not None and not has_weights_file
            and not figures.indexed_keys(records, "train/pair_attention")
            and (method not in methods.METHODS or not methods.METHODS[method].meta_networks)):
        print(f"note: method {method!r} has no meta-networks and learns no attention over "
              "pairs: no pair- or channel-weight pictures")
        return written
    if method is None and not has_weights_file and not figures.indexed_keys(
            records, "train/channel_weight_entropy"):
        print(f"note: no method in {wd.CONFIG}/{wd.RESULT} and no {wd.TRANSFER_WEIGHTS}: "
              "no weight pictures")
        return written
    weights = weight_plots.load_transfer_weights(workdir) if has_weights_file else None
    where = weight_plots.where_of(weights) if weights is not None else None
    if where is not None:
        written.append(weight_plots.plot_pair_weights(
            workdir, os.path.join(out_dir, f"{where['key']}.png")))
    elif weights is None:
        print(f"note: {weights_path} not found (written at the end of training): no "
              "pair-weight heat map")
    else:
        print(f"note: {weights_path} has no pair weights (method {method or '?'} learns "
              "none): no pair-weight heat map")
    if ((weights is not None and weights.get("channel_weights") is not None)
            or figures.indexed_keys(records, "train/channel_weight_entropy")):
        written.append(weight_plots.plot_channel_weights(
            workdir, os.path.join(out_dir, "channel_weights.png")))
    elif method is None or method not in methods.METHODS or methods.METHODS[
            method].meta_networks:   # (AFD and SemCKD weight no channels: nothing to say)
        print("note: no channel weights or channel-weight entropies: no channel-weight "
              "picture")
    return written


def _parse_compare(text: str) -> tuple[str, list[str]]:
    label, sep, dirs = text.partition("=")
    if not sep or not label or not dirs:
        raise argparse.ArgumentTypeError(f"--compare {text!r}: expected LABEL=DIR[,DIR...]")
    return label, [d for d in dirs.split(",") if d]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.tools.plots",
        description="Pictures of a training workdir: learning curves; for L2T-ww the "
                    "learned pair weights and for AFD and SemCKD their attention per pair "
                    "(where); for L2T-w/L2T-ww the channel weights (what).")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/plots)")
    parser.add_argument("--compare", action="append", type=_parse_compare, default=[],
                        metavar="LABEL=DIR[,DIR...]",
                        help="also draw learning_curves_compare.png with these runs (several "
                             "dirs = seeds, shown as mean and band), and where_compare.png: "
                             "the per-pair weights of those that learn them (L2T-ww's "
                             "lambda, AFD's and SemCKD's attention) side by side, seeds "
                             "averaged; repeatable")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir, "plots")
    try:
        written = plot_workdir(args.workdir, out)
        if args.compare:
            compare = dict(args.compare)
            written.append(metric_plots.plot_learning_curves(
                compare, os.path.join(out, "learning_curves_compare.png")))
            panels = weight_plots.where_panels(compare)
            if panels:
                written.append(figures.save(weight_plots.where_compare_figure(panels),
                                            os.path.join(out, "where_compare.png")))
            else:
                print("note: no run to compare has per-pair weights: no where_compare.png")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
