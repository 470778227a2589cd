"""JupyterLab as a data scientist sees it, in headless chromium: a task notebook opens with its upstream injected."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import copy_project, free_port, start_service, stop_service
from playwright.sync_api import expect

TOKEN = "nbs-test-token"
INJECTED = "This cell was injected automatically"
WAIT = 60_000  # ms a condition may take to hold on a loaded machine (the kernel's start, mostly)


@pytest.fixture(params=["ploomber on", "ploomber off"])
def lab(request, tmp_path):
    "JupyterLab on a free port of 127.0.0.1 in a project copy, with Ploomber's extension on or (to prove the test can fail) off."
    root = copy_project(tmp_path / "project")
    port = free_port()
    command = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--allow-root",
               "--ip", "127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}"]
    settings = tmp_path / "jupyter"  # nothing of the user's own Jupyter set-up, nothing written to it
    (settings / "config").mkdir(parents=True)
    if request.param == "ploomber off":  # the user's config directory outranks the environment's
        (settings / "config/jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"ploomber": False}}}))
    env = {"PYTHONPATH": str(root), "PLOOMBER_STATS_ENABLED": "false", "JUPYTER_CONFIG_DIR": str(settings / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings / "lab"), "JUPYTERLAB_WORKSPACES_DIR": str(settings / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(settings / "runtime")}
    url = f"http://127.0.0.1:{port}"
    server = start_service(command, f"{url}/api/status?token={TOKEN}", root, tmp_path / "lab.log", env)
    yield {"url": url, "root": root, "injection": request.param == "ploomber on", "log": tmp_path / "lab.log"}
    stop_service(server)


def _kernels(url: str) -> list[dict]:
    "The server's kernels; none yet while it answers 500, as jupyter_server does when asked while a kernel starts."
    answer = httpx.get(f"{url}/api/kernels?token={TOKEN}")  # (KeyError 'last_activity' in its log)
    return answer.json() if answer.status_code == 200 else []


def wait_for_kernel(page, url: str) -> None:
    "Wait until the server has the notebook's kernel up and idle, and the page shows it idle."
    deadline = time.monotonic() + WAIT / 1000
    while not any(k["execution_state"] == "idle" for k in _kernels(url)):
        assert time.monotonic() < deadline, "the notebook's kernel never became idle"
        time.sleep(0.3)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=WAIT)


def test_task_notebook_opens_with_its_upstream_injected_and_runs(lab, page):
    page.goto(f"{lab['url']}/lab/tree/notebooks/pipeline/40_train.ipynb?token={TOKEN}")
    listing = page.locator(".jp-DirListing-item")
    listing.filter(has_text="40_train.ipynb").wait_for()
    assert {"10_ingest.ipynb", "60_register.ipynb"} <= {t.split("\n")[0] for t in listing.all_inner_texts()}
    assert "notebooks" in page.locator(".jp-BreadCrumbs").inner_text()
    cells = page.locator(".jp-Notebook .jp-Cell")
    cells.filter(has_text='upstream = ["features", "validate"]').wait_for()  # the notebook's own parameters cell
    injected = cells.filter(has_text=INJECTED)
    if not lab["injection"]:
        # the injection is part of the notebook the server hands the page: once its own cells show,
        # an injected cell would show with them, and the served notebook would hold it
        assert injected.count() == 0, "without Ploomber's extension nothing may be injected"
        served = httpx.get(f"{lab['url']}/api/contents/notebooks/pipeline/40_train.ipynb?token={TOKEN}").json()
        assert not [c for c in served["content"]["cells"] if INJECTED in c["source"]]
        # the page asks for the notebook's kernel: a server stopped while it starts one spends its
        # whole 20 s grace on shutting down (seen with two test workers); leave once it is up
        wait_for_kernel(page, lab["url"])
        return
    injected.wait_for()
    text = injected.inner_text()
    assert 'model_params = {"classification": {"C": 0.1}' in text  # the grid's first candidate, from pipeline.yaml
    assert f'"train": "{lab["root"]}/products/data/train.parquet"' in text

    # run the injected cell, then a new cell below it that reads what it set, in the project's kernel
    # Each key waits for what the one before it did: on a loaded machine the kernel starts late and
    # the page redraws late, and a key sent early lands in the wrong cell or mode.
    notebook_panel = page.locator(".jp-Notebook").first
    # a cell run before the page's kernel is ready is not run at all (seen on a loaded machine: the
    # injected cell stayed `[ ]`, so the next cell found no `upstream`)
    wait_for_kernel(page, lab["url"])
    injected.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    expect(injected.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[1\]"), timeout=WAIT)  # the kernel ran it
    page.keyboard.press("Escape")
    expect(notebook_panel).to_have_class(re.compile("jp-mod-commandMode"), timeout=WAIT)
    page.keyboard.press("a")  # a new cell above the one Shift+Enter moved to: right after the injected cell
    expect(page.locator(".jp-Notebook .jp-Cell.jp-mod-active .cm-content")).to_have_text("", timeout=WAIT)
    page.keyboard.press("Enter")
    expect(notebook_panel).to_have_class(re.compile("jp-mod-editMode"), timeout=WAIT)
    page.keyboard.type('import sys; print(sys.prefix, upstream["features"]["train"])')
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output", has_text="train.parquet")
    output.wait_for()
    assert output.inner_text().strip() == f"{sys.prefix} {lab['root']}/products/data/train.parquet"

    # saved from JupyterLab, the notebook keeps the new cell and loses the injected one
    notebook = lab["root"] / "notebooks/pipeline/40_train.ipynb"
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while "sys.prefix" not in notebook.read_text():
        assert time.monotonic() < deadline, "the notebook was not saved"
        time.sleep(0.3)
    saved = json.loads(notebook.read_text())
    assert not [c for c in saved["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert any("sys.prefix" in "".join(c["source"]) for c in saved["cells"])
