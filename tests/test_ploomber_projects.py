"""Ploomber's own kinds of project, adopted by running `nbs` where `ploomber build` ran: each is built here, in
a folder of its own, never copied from elsewhere (README: "From Ploomber")."""

from __future__ import annotations

import os
import sqlite3
import textwrap
from pathlib import Path

import pytest
from conftest import run_nbs, runs_of, store

from nbs_lib.core.lineage import file_digest

FUNCTIONS = {
    "pipeline.yaml": """\
        tasks:
          - source: tasks.raw
            product: out/raw.csv
          - source: tasks.clean
            product: out/clean.csv
            params:
              rows: '{{rows}}'
          - source: tasks.report
            product: out/report.txt
        """,
    "env.yaml": "rows: 2\n",
    "tasks.py": """\
        from pathlib import Path

        from nbs_lib.core.tracking import log_metrics


        def raw(product):
            Path(str(product)).write_text("a\\n1\\n2\\n3\\n")


        def clean(product, upstream, rows):
            lines = Path(str(upstream["raw"])).read_text().splitlines()
            Path(str(product)).write_text("\\n".join(lines[: rows + 1]) + "\\n")


        def report(product, upstream):
            lines = len(Path(str(upstream["clean"])).read_text().splitlines())
            log_metrics({"lines": lines})  # on the task's run: functions run in a process that knows it
            Path(str(product)).write_text(f"{lines} lines\\n")
        """,
}


def _project(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def _ran(done) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("edited, old, new, again", [
    ("raw", 'write_text("a\\n1\\n2\\n3\\n")', 'write_text("a\\n4\\n5\\n6\\n")', 3),  # and everything downstream
    ("clean", 'lines[: rows + 1]', 'lines[: rows + 1][::-1]', 2),
    ("report", 'f"{lines} lines', 'f"counted {lines} lines', 1),
])
def test_an_edited_function_task_runs_again_with_its_downstream_never_up_to_date(tmp_path, edited, old, new, again):
    project = _project(tmp_path, FUNCTIONS)
    assert "Ran 3 of 3 tasks" in _ran(run_nbs("run", cwd=project))
    assert "All 3 tasks are up to date" in _ran(run_nbs("run", cwd=project))
    assert (project / ".nbs" / "fresh-build.json").is_file(), "the no-op fast path was not armed: this proves nothing"
    _edit(project / "tasks.py", old, new)
    status = _ran(run_nbs("status", cwd=project))
    would_run = [line.split()[0] for line in status.splitlines() if "would run" in line]
    assert len(would_run) == again and edited in would_run, status
    assert f"Ran {again} of 3 tasks" in _ran(run_nbs("run", cwd=project))
    assert "All 3 tasks are up to date" in _ran(run_nbs("run", cwd=project))


# a grid of function tasks: each candidate its own task, in a process of its own
GRID = {
    "pipeline.yaml": """\
          - source: tasks.fit
            name: fit-[[n]]
            product: out/fit-[[n]].txt
            grid:
              n: [1, 2]
        """,
    "tasks.py": """\


        def fit(product, upstream, n):
            log_metrics({"n": n, "pid": os.getpid()})
            Path(str(product)).write_text(Path(str(upstream["clean"])).read_text() * n)
        """,
}


def test_a_project_as_ploomber_runs_it_is_tracked_without_an_edit(tmp_path):
    # no env.yaml, `executor: parallel`: nbs builds it with a TrackedExecutor in Ploomber's place
    files = {**FUNCTIONS, "pipeline.yaml": "        executor: parallel\n" + FUNCTIONS["pipeline.yaml"].replace("'{{rows}}'", "2").rstrip(" ")
             + GRID["pipeline.yaml"], "tasks.py": "import os\n" + textwrap.dedent(FUNCTIONS["tasks.py"]) + textwrap.dedent(GRID["tasks.py"])}
    del files["env.yaml"]
    project = _project(tmp_path, files)
    done = run_nbs("run", cwd=project)
    built = _ran(done)
    assert "Ran 5 of 5 tasks" in built and (project / "out" / "report.txt").read_text() == "3 lines\n"
    assert (project / "out" / "fit-2-1.txt").read_text() == "a\n1\n2\n" * 2  # Ploomber numbers a grid's products
    assert "Tracked in sqlite:///mlflow.db" in built and "make " not in built and (project / "mlflow.db").is_file(), built
    assert f"up to {os.cpu_count()} tasks at once" in done.stderr, done.stderr  # Parallel's processes: one per core
    build, *tasks = runs_of(project)
    assert build.data.tags["nbs.kind"] == "pipeline" and build.info.status == "FINISHED"
    assert sorted((t.data.tags["nbs.task"], t.info.status) for t in tasks) == [
        ("clean", "FINISHED"), ("fit-1", "FINISHED"), ("fit-2", "FINISHED"), ("raw", "FINISHED"), ("report", "FINISHED")]
    for task in tasks:  # each its products' digests and its source's, the function's module
        written = project / "out" / {"raw": "raw.csv", "clean": "clean.csv", "report": "report.txt", "fit-1": "fit-1-0.txt",
                                     "fit-2": "fit-2-1.txt"}[task.data.tags["nbs.task"]]
        assert task.data.tags["nbs.output.product"].endswith(f"sha256:{file_digest(written)}"), task.data.tags
        assert task.data.tags["nbs.source.sha256"] == file_digest(project / "tasks.py")
    metrics = {t.data.tags["nbs.task"]: t.data.metrics for t in tasks}
    assert metrics["report"] == {"lines": 3.0} and (metrics["fit-1"]["n"], metrics["fit-2"]["n"]) == (1.0, 2.0)
    assert metrics["fit-1"]["pid"] != metrics["fit-2"]["pid"]  # each candidate in a process of its own
    assert build.data.metrics["report.lines"] == 3.0 and build.data.metrics["fit-2.n"] == 2.0
    assert "up to date" in _ran(run_nbs("status", cwd=project))
    one_at_a_time = run_nbs("run", "--force", "-p", "jobs=1", cwd=project)  # over `parallel`'s processes
    assert "Ran 5 of 5 tasks" in _ran(one_at_a_time) and "up to 1 task at once" in one_at_a_time.stderr
    assert "expects int" in run_nbs("run", "-p", "jobs=two", cwd=project).stderr
    refused = run_nbs("run", "-p", "rows=3", cwd=project)  # pipeline.yaml has no {{rows}} here
    assert refused.returncode == 2 and "parameter 'rows' is not declared in pipeline.yaml" in refused.stderr, refused.stderr

    before = {r.info.run_id for r in runs_of(project)}
    _edit(project / "tasks.py", 'Path(str(product)).write_text("a', 'raise ValueError("no rows today")\n    Path(str(product)).write_text("a')
    failed = run_nbs("run", cwd=project)
    assert failed.returncode == 1 and "ValueError: no rows today" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr
    build, raw = [r for r in runs_of(project) if r.info.run_id not in before]
    assert (build.info.status, raw.data.tags["nbs.task"], raw.info.status) == ("FAILED", "raw", "FAILED")
    assert raw.data.tags["nbs.error.type"] == "ValueError", raw.data.tags


def test_a_project_with_an_executor_of_its_own_is_built_by_it_and_says_it_is_not_tracked(tmp_path):
    files = {**FUNCTIONS, "pipeline.yaml": "        executor:\n          dotted_path: quiet.Quiet\n"
             + FUNCTIONS["pipeline.yaml"].replace("'{{rows}}'", "2"),
             "quiet.py": "from ploomber.executors import Serial\n\n\nclass Quiet(Serial):\n    pass\n"}
    del files["env.yaml"]
    project = _project(tmp_path, files)
    built = _ran(run_nbs("run", cwd=project))
    assert "Ran 3 of 3 tasks" in built and (project / "out" / "report.txt").read_text() == "3 lines\n"
    assert "Not tracked in MLflow: pipeline.yaml's executor quiet.Quiet builds on its own" in built, built
    assert "Tracked in" not in built and not (project / "mlflow.db").exists()
    refused = run_nbs("run", "-p", "jobs=2", cwd=project)  # never a setting silently ignored
    assert refused.returncode == 2 and "the executor Quiet decides that itself" in refused.stderr, refused.stderr


HTML_REPORT = {
    "pipeline.yaml": """\
        tasks:
          - source: report.py
            product:
              nb: out/report.html
              data: out/data.csv
        """,
    "report.py": """\
        # %% tags=["parameters"]
        upstream = None
        product = None

        # %%
        from pathlib import Path
        Path(product["data"]).write_text("a\\n1\\n")
        print("rows written")
        """,
}


def test_a_notebook_kept_as_html_is_attached_to_its_run_and_a_failure_is_failed(tmp_path):
    project = _project(tmp_path, HTML_REPORT)
    assert "Ran 1 of 1 tasks" in _ran(run_nbs("run", cwd=project))
    (task,) = [r for r in runs_of(project) if r.data.tags["nbs.kind"] == "task"]
    assert task.info.status == "FINISHED"
    page = Path(store(project).download_artifacts(task.info.run_id, "notebook/report.html", str(tmp_path / "dl")))
    assert "rows written" in page.read_text() and page.read_bytes() == (project / "out" / "report.html").read_bytes()

    _edit(project / "report.py", 'print("rows written")', 'raise RuntimeError("no rows today")')
    failed = run_nbs("run", cwd=project)
    assert failed.returncode == 1 and "RuntimeError: no rows today" in failed.stderr, failed.stderr
    statuses = sorted((r.data.tags["nbs.kind"], r.info.status) for r in runs_of(project))
    assert statuses == [("pipeline", "FAILED"), ("pipeline", "FINISHED"), ("task", "FAILED"), ("task", "FINISHED")], statuses


def test_a_spec_ploomber_refuses_is_one_line_with_ploombers_reason(tmp_path):
    spec = HTML_REPORT["pipeline.yaml"].replace("product:", "bogus_key: 1\n            product:")
    project = _project(tmp_path, {**HTML_REPORT, "pipeline.yaml": spec})
    done = run_nbs("run", cwd=project)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    said, hint = done.stderr.strip().splitlines()
    assert "unexpected keyword argument 'bogus_key'" in said, said  # the reason, not only Ploomber's wrapper
    assert "docs.ploomber.io" in hint and "fresh clone" not in hint, hint
    # a reason over two lines (what to install, then how: nbconvert's PDF exporter without pyppeteer) is one line
    (project / "pipeline.yaml").write_text(spec.replace("bogus_key: 1\n", "nbconvert_exporter_name: webpdf\n"))
    done = run_nbs("run", cwd=project)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 2, done.stderr
    assert "pyppeteer is required to use webpdf, install it with: pip install" in done.stderr, done.stderr


SQL_ON_SQLITE = {
    "pipeline.yaml": """\
        meta:
          extract_upstream: true
          product_default_class:
            SQLScript: SQLiteRelation
        clients:
          SQLScript: clients.get
          SQLiteRelation: clients.get
        tasks:
          - source: sql/numbers.sql
            product: [numbers, table]
          - source: sql/doubled.sql
            product: [doubled, table]
        """,
    "clients.py": """\
        from ploomber.clients import SQLAlchemyClient


        def get():
            return SQLAlchemyClient("sqlite:///data.db")
        """,
    "sql/numbers.sql": """\
        DROP TABLE IF EXISTS {{product}};
        CREATE TABLE {{product}} AS SELECT 1 AS x UNION ALL SELECT 2;
        """,
    "sql/doubled.sql": """\
        DROP TABLE IF EXISTS {{product}};
        CREATE TABLE {{product}} AS SELECT x * 2 AS y FROM {{upstream['numbers']}};
        """,
}


def test_sql_scripts_building_sqlite_tables_through_ploombers_clients_are_tracked(tmp_path):
    # nbs writes nothing to the tasks' database: a lock held there made them fail ("database is locked")
    project = _project(tmp_path, SQL_ON_SQLITE)
    assert "Ran 2 of 2 tasks" in _ran(run_nbs("run", cwd=project))
    tasks = [r for r in runs_of(project) if r.data.tags["nbs.kind"] == "task"]
    assert sorted((t.data.tags["nbs.task"], t.info.status) for t in tasks) == [("doubled", "FINISHED"), ("numbers", "FINISHED")]
    for task in tasks:
        assert task.data.tags["nbs.source.sha256"] == file_digest(project / "sql" / f"{task.data.tags['nbs.task']}.sql")
    assert "All 2 tasks are up to date" in _ran(run_nbs("run", cwd=project))
    _edit(project / "sql" / "numbers.sql", "SELECT 2;", "SELECT 3;")
    assert "Ran 2 of 2 tasks" in _ran(run_nbs("run", cwd=project))
    with sqlite3.connect(project / "data.db") as db:
        assert db.execute("SELECT y FROM doubled ORDER BY y").fetchall() == [(2,), (6,)]


def test_sql_tasks_on_sqlite_in_memory_share_the_database_and_leave_no_traceback(tmp_path):
    # Ploomber's serial builds them on one thread, the one whose connection holds the database; its own
    # close then has SQLAlchemy log a traceback, which nbs's does not
    files = {**SQL_ON_SQLITE, "clients.py": SQL_ON_SQLITE["clients.py"].replace("sqlite:///data.db", "sqlite://"),
             "pipeline.yaml": """\
        clients:
          SQLScript: clients.get
        tasks:
          - source: sql/numbers.sql
            product: [numbers, table]
          - source: sql/doubled.sql
            product: [doubled, table]
        """}
    project = _project(tmp_path, files)
    done = run_nbs("run", cwd=project)
    assert "Ran 2 of 2 tasks" in _ran(done) and "Traceback" not in done.stderr, done.stderr
    tasks = [r for r in runs_of(project) if r.data.tags["nbs.kind"] == "task"]
    assert sorted((t.data.tags["nbs.task"], t.info.status) for t in tasks) == [("doubled", "FINISHED"), ("numbers", "FINISHED")]


def test_a_shell_task_is_tracked_and_its_failure_is_one_line_on_a_failed_run(tmp_path):
    project = _project(tmp_path, {
        "pipeline.yaml": """\
            clients:
              ShellScript: ploomber.clients.ShellClient
            tasks:
              - source: make.sh
                product: out/made.txt
            """,
        "make.sh": "mkdir -p out\necho made > {{product}}\n"})
    assert "Ran 1 of 1 tasks" in _ran(run_nbs("run", cwd=project))
    assert (project / "out" / "made.txt").read_text() == "made\n"
    _edit(project / "make.sh", "echo made > {{product}}\n", "echo half > {{product}}\necho broken >&2\nexit 3\n")
    failed = run_nbs("run", cwd=project)
    assert failed.returncode == 1, failed.stderr
    said = [line for line in failed.stderr.splitlines() if line.startswith("nbs: error:")]
    assert len(said) == 1 and "stderr: broken exit status 3" in said[0], failed.stderr
    statuses = sorted((r.data.tags["nbs.kind"], r.info.status) for r in runs_of(project))
    assert statuses == [("pipeline", "FAILED"), ("pipeline", "FINISHED"), ("task", "FAILED"), ("task", "FINISHED")], statuses


def test_without_env_yaml_p_fills_the_placeholders_of_pipeline_yaml(tmp_path):
    files = dict(FUNCTIONS)
    del files["env.yaml"]
    project = _project(tmp_path, files)
    unset = run_nbs("run", cwd=project)
    assert unset.returncode == 2 and unset.stderr.splitlines() == [
        f"nbs: error: {project / 'pipeline.yaml'}: uses {{{{rows}}}}, which has no value",
        "  hint: set it with -p rows=VALUE, or declare rows: DEFAULT in env.yaml"], unset.stderr
    assert "Ran 3 of 3 tasks" in _ran(run_nbs("run", "-p", "rows=1", cwd=project))
    assert (project / "out" / "clean.csv").read_text() == "a\n1\n"  # a number, as YAML reads it
    status = _ran(run_nbs("status", "-p", "rows=2", cwd=project))
    assert "parameter rows changed: 1 -> 2" in status, status
    assert "All 3 tasks are up to date" in _ran(run_nbs("run", "-p", "rows=1", cwd=project))
    (project / "staging.yaml").write_text("rows: 2\n")  # --env-file fills them too: a second environment's values
    assert "Ran 2 of 3 tasks" in _ran(run_nbs("run", "--env-file", "staging.yaml", cwd=project))
    (project / "staging.yaml").write_text("rows: 1\nrow: 2\n")
    unknown = run_nbs("run", "--env-file", "staging.yaml", cwd=project)
    assert unknown.returncode == 2 and "'row' in" in unknown.stderr and "is not declared in pipeline.yaml" in unknown.stderr, unknown.stderr
