"""Summarizes finished runs as the paper's tables; the logic is in l2t_jax.tools.summaries
(and l2t_jax.tools.metric_plots for the figure).

    python experiments/summarize.py --root=runs                       # main table
    python experiments/summarize.py --root=runs --table=multisource --out=reports
    python experiments/summarize.py --root=runs --table=limited       # + limited_data.png

Prints the Markdown table and writes table.md and table.csv (and, for the limited table,
limited_data.png) into --out. Results are read from <root>/<table> when that directory
exists (run_table.py's layout), otherwise from the whole of --root, and filtered to the
table's runs; --out defaults to that same directory, so the tables do not overwrite each
other.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from l2t_jax.tools import summaries, tables  # noqa: E402

TITLES = {"main": "Main table: test accuracy (%)",
          "multisource": "Multi-source transfer to STL-10: test accuracy (%)",
          "limited": "Limited training data: test accuracy (%)"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory holding the runs")
    parser.add_argument("--table", choices=tables.TABLES, default="main")
    parser.add_argument("--out", default=None,
                        help="output directory (default: <root>/<table>, or --root)")
    args = parser.parse_args(argv)
    table_root = os.path.join(args.root, args.table)
    search_root = table_root if os.path.isdir(table_root) else args.root
    out = args.out or search_root
    try:
        results = summaries.select_table(summaries.collect_results(search_root),
                                         args.table)
        rows = summaries.summarize(results, by=summaries.TABLE_GROUPING[args.table])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    markdown = summaries.to_markdown(rows, title=TITLES[args.table])
    print(markdown)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown)
    written = [os.path.join(out, "table.md"),
               summaries.to_csv(rows, os.path.join(out, "table.csv"))]
    if args.table == "limited" and results:
        from l2t_jax.tools import metric_plots  # matplotlib only when there is a figure to draw
        written.append(metric_plots.plot_limited_data(
            results, os.path.join(out, "limited_data.png")))
    print(f"{len(results)} runs from {search_root}; wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
