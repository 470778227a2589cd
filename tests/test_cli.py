"""`nbs` refuses bad input before any kernel starts or any run is created, with exit code 2."""

from __future__ import annotations

import pytest
from conftest import run_nbs


def test_help_lists_the_commands(tmp_path):
    done = run_nbs("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "run " in done.stdout and "check " in done.stdout
    run_help = run_nbs("run", "--help", cwd=tmp_path)
    assert "-p, --param NAME=VALUE" in run_help.stdout and "--force" in run_help.stdout
    assert "-q, --quiet" in run_help.stdout and "-v, --verbose" in run_help.stdout
    from importlib.metadata import version

    assert run_nbs("--version", cwd=tmp_path).stdout == f"nbs {version('nbs_lib')}\n"


def test_outside_a_project(tmp_path):
    done = run_nbs("run", cwd=tmp_path)
    assert done.returncode == 2
    assert "no pipeline.yaml here or in any parent folder" in done.stderr


def test_parameter_no_task_declares(project):
    done = run_nbs("run", "-p", "learning_rate=0.1", cwd=project)
    assert done.returncode == 2
    assert "parameter 'learning_rate' is not declared in env.yaml" in done.stderr
    assert "valid parameters: alert_webhook, cell_timeout, cv_folds, data_path, drop_columns, entity, environment_variables, " \
           "event_timestamp, experiment," in done.stderr
    assert not (project / "mlflow.db").exists(), "a refused build must not touch the store"


def test_parameter_name_that_is_code(project):
    done = run_nbs("run", "-p", "__import__('os').system('touch pwned')=1", cwd=project)
    assert done.returncode == 2
    assert "is not of the form name=value" in done.stderr
    assert not (project / "pwned").exists()


def test_parameter_of_the_wrong_type(project):
    done = run_nbs("run", "-p", "test_size=a quarter", cwd=project)
    assert done.returncode == 2
    assert "parameter 'test_size' expects float (default 0.2), got 'a quarter'" in done.stderr


def test_malformed_pipeline_yaml(project):
    spec = project / "pipeline.yaml"
    spec.write_text(spec.read_text().replace("    name: validate", "   name: validate", 1))
    done = run_nbs("run", cwd=project)
    assert done.returncode == 2
    assert "pipeline.yaml: line" in done.stderr
    assert not (project / "mlflow.db").exists()


def test_pipeline_yaml_that_ploomber_rejects(project):
    spec = project / "pipeline.yaml"
    spec.write_text(spec.read_text().replace("notebooks/pipeline/20_validate.ipynb",
                                             "notebooks/pipeline/missing.ipynb"))
    done = run_nbs("run", cwd=project)
    assert done.returncode == 2
    assert "pipeline.yaml:" in done.stderr and "missing.ipynb" in done.stderr
    assert not (project / "mlflow.db").exists()


def test_only_with_a_task_that_does_not_exist(project):
    done = run_nbs("run", "--only", "deploy", cwd=project)
    assert done.returncode == 2
    assert "no task named 'deploy'" in done.stderr and "tasks: ingest, eda, validate" in done.stderr
    assert not (project / "mlflow.db").exists()


def test_env_file_is_checked_like_parameters(project):
    (project / "env.prod.yaml").write_text("seed: 7\nlearning_rate: 0.1\n")
    done = run_nbs("status", "--env-file", "env.prod.yaml", cwd=project)
    assert done.returncode == 2
    assert "parameter 'learning_rate' in" in done.stderr and "is not declared in env.yaml" in done.stderr
    (project / "env.prod.yaml").write_text("seed: seven\n")
    done = run_nbs("status", "--env-file", "env.prod.yaml", cwd=project)
    assert done.returncode == 2 and "parameter 'seed' expects int" in done.stderr
    (project / "env.prod.yaml").write_text("seed: 7\n")
    done = run_nbs("status", "--env-file", "env.prod.yaml", cwd=project)
    assert done.returncode == 0 and "a product is missing" in done.stdout


@pytest.mark.parametrize("given,says", [
    ("tune_model=sklearn.svm.SVQ", "'sklearn.svm.SVQ' names no scikit-learn estimator"),
    ("tune_space={gamma: {low: 1, high: 2}}", "names 'gamma', which LogisticRegression does not take (task 'tune')"),
    ("task=clustering", "parameter 'task' is 'clustering': input should be 'auto', 'classification' or 'regression'"),
    ("cv_folds=1", "parameter 'cv_folds' is 1: input should be greater than or equal to 2"),
])
def test_a_candidate_that_cannot_train_is_refused_before_any_kernel_starts(project, given, says):
    done = run_nbs("run", "-p", given, cwd=project)
    assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr  # the message, and the hint when there is one
    assert not (project / "mlflow.db").exists() and not (project / "products").exists(), "nothing ran"


def test_a_folder_given_as_output_takes_the_file_by_its_name(project, tmp_path):
    import nbformat

    folder = tmp_path / "out"
    folder.mkdir()
    exported = run_nbs("export", "airflow", "-o", str(folder), cwd=project)
    assert exported.returncode == 0, exported.stderr
    assert "dag_id='nbs_pipeline'" in (folder / "nbs_pipeline.py").read_text()
    notebook = tmp_path / "hello.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hello')")]), notebook)
    executed = run_nbs("execute", str(notebook), "-o", str(folder), cwd=project)
    assert executed.returncode == 0, executed.stderr
    assert "hello" in (folder / "hello.ipynb").read_text()
