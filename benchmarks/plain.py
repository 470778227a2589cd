"""The baseline of the pipeline benchmarks: the pipeline's notebooks run as one plain Python process.

Each argument is an executed notebook of `nbs run` (so its parameters and upstream product paths
are already injected); their code cells run in the order given, each notebook in a fresh
namespace, with no kernel, no papermill, no Ploomber and no tracking (NBS_RUN_ID unset, so the
notebooks' nbs_lib.core.tracking calls log nothing). What the notebooks themselves do, such as
registering the model, they still do.
Usage: python benchmarks/plain.py products/executed/ingest.ipynb products/executed/eda.ipynb ...
"""

from __future__ import annotations

import json
import os
import sys


def run_notebook(path: str) -> None:
    "Execute the code cells of the notebook at `path` in a namespace of their own."
    with open(path, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path}[{index}]", "exec"), namespace)


def main(paths: list[str]) -> int:
    os.environ.pop("NBS_RUN_ID", None)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for path in paths:
        run_notebook(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
