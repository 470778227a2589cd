"""`nbs docs` builds the documentation site from the project's own notebooks, every link leading to a page."""

from __future__ import annotations

from conftest import ROOT, run_nbs


def test_the_site_builds_from_the_notebooks_and_every_link_leads_to_a_page(tmp_path):
    done = run_nbs("docs", "--out", str(tmp_path / "site"), "--root", str(ROOT), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {page.name for page in (tmp_path / "site").glob("*.html")}
    notebooks = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert {f"{name}.html" for name in notebooks - {"index"}} | {"index.html", "benchmarks-README.html"} == pages
    index = (tmp_path / "site" / "index.html").read_text()
    assert "<title>nbs: notebooks that run as a tracked pipeline</title>" in index
    assert 'href="52_serve.html"' in index and 'href="notebooks/' not in index  # README.md's links, pointed at pages
    assert f"Wrote {len(pages)} pages" in done.stdout
