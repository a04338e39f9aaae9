"""The Colab notebook runs top to bottom in smoke mode. A module of its own (not part of
test_docs.py) so that pytest-xdist can run it beside the documented commands: each file runs
on one worker, and the two are the suite's longest."""

from __future__ import annotations

import os

from helpers import xla_flags
from test_docs import ROOT, doc_env, local_gpt2  # noqa: F401 -- fixtures, one set per module


def test_colab_notebook_runs_top_to_bottom_in_smoke_mode(local_gpt2, doc_env, tmp_path,
                                                         monkeypatch):
    """The Colab notebook, executed as written with its parameters cell followed by an injected
    one (as papermill does): SMOKE on, the local GPT-2 as teacher, Shakespeare as data."""
    import nbclient
    import nbformat

    path = os.path.join(ROOT, "notebooks", "colab_tpu_quickstart.ipynb")
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f"SMOKE = True\nTEACHER = {local_gpt2!r}\nDISTILL_DATA = None\n"
        f"WORKDIR = {str(tmp_path / 'runs')!r}"))
    for key, value in doc_env[1].items():  # the kernel shares the commands' caches
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "ROMEO:" in outputs
    assert (tmp_path / "runs" / "distill_factored_eval" / "report.md").exists()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the evaluation plots are not shown inline"
