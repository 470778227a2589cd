"""What a person waits for at the command line of a built project: each command's whole process, measured against
the floor of any command that asks MLflow (importing its client), in alternating repetitions."""

from __future__ import annotations

from pathlib import Path

from common import BIN, Figure, run_process

FLOOR = "from mlflow.tracking import MlflowClient"  # what every command that must ask MLflow pays first


def measure(project: Path, env: dict, repeat: int, warm_up: bool = True) -> list[Figure]:
    """`nbs status`, `models`, `runs`, `lineage`, `schedule list`, `features` and `nbs predict` of the holdout, on the
    built `project`; with `warm_up`, a first untimed round (compiled bytecode, the feature definitions' snapshot)."""
    nbs = str(BIN / "nbs")
    commands = {  # name: (arguments, target, seconds: over the floor for a margin, else the median's own)
        "nbs status": (["status"], "absolute", 0.5),
        "nbs models": (["models"], "margin", 0.5),
        "nbs runs": (["runs"], "margin", 0.5),
        "nbs lineage": (["lineage", "models:/nbs-classifier@champion"], "margin", 0.5),
        "nbs schedule list": (["schedule", "list"], "margin", 0.5),
        "nbs features": (["features"], "absolute", 2.0),
        "nbs predict, the 114-row holdout": (["predict", "-q", "--input", "products/data/test.parquet", "--output",
                                              "scored.csv"], "absolute", 3.0),
    }
    run_process([nbs, "run", "-q"], project, env)  # up to date, as after a person's build: not timed
    floor, times = [], {name: [] for name in commands}
    for round_ in range(repeat + warm_up):
        timed = round_ >= warm_up
        seconds = run_process([str(BIN / "python"), "-c", FLOOR], project, env)[0]
        if timed:
            floor.append(seconds)
        for name, (arguments, _, _) in commands.items():
            seconds = run_process([nbs, *arguments], project, env)[0]
            if timed:
                times[name].append(seconds)
    figures = []
    for name, (arguments, kind, limit) in commands.items():
        figure = Figure(f"{name}, whole process", f"nbs {' '.join(arguments)}", f"python -c '{FLOOR}'", times[name],
                        floor, target=f"<= +{limit:g} s over the baseline" if kind == "margin" else f"<= {limit:g} s")
        if kind == "margin":
            figure.margin_target = limit
        else:
            figure.absolute_target = limit
        figures.append(figure)
    if warm_up:
        figures[0].notes.append("after one untimed round of every command: bytecode compiled, the feature "
                                "definitions' snapshot written (a build's catalogue task leaves one too)")
    return figures
