"""Execute a book notebook in place and keep only what should be committed.

    .venv/bin/python tools/execute_notebook.py book/chapter1.ipynb

Keeps text outputs (what nbval compares) and widget-view references; drops BokehJS, javascript and HTML blobs
that carry per-run ids, the saved widget state (it embeds the whole bokeh document) and execution timings.

Prints the wall time and the kernel's CPU time (user + system, read from the kernel itself by one extra cell that is
not saved): on a loaded machine the wall time says little, the CPU time is what the notebook costs one idle core.
The book notebooks are jupytext pairs: edit ``book/X.md``, run ``.venv/bin/jupytext --sync book/X.md``, then this.
"""
import sys
import time

import nbformat
from nbclient import NotebookClient

DROP_MIME = ("application/javascript", "application/vnd.bokehjs_load.v0+json", "application/vnd.bokehjs_exec.v0+json")
CPU_PROBE = ("import resource as _r\n_u = _r.getrusage(_r.RUSAGE_SELF)\n"
             "print(f'{_u.ru_utime + _u.ru_stime:.1f}')\ndel _r, _u")

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CPU_PROBE))
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "book"}}).execute()
    wall = time.perf_counter() - t0
    probe = nb.cells.pop()
    cpu = "".join(o.get("text", "") for o in probe.outputs).strip()
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data:
                for mime in DROP_MIME:
                    data.pop(mime, None)
                if "text/html" in data and "bokeh" in data["text/html"].lower():
                    data.pop("text/html")
            out.get("metadata", {}).clear() if isinstance(out.get("metadata"), dict) else None
    nbformat.write(nb, path)
    print(f"{path}: executed in {wall:.1f} s wall, kernel CPU {cpu} s")
