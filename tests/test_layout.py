"""The code's layout, checked: which folder may import which (README, "How the code is laid out").

Stages meet through building blocks and files, never through each other's run loops: a later stage may use an
earlier stage's backbones, preprocessing, images, sources, Head, sampler or noise, but never its orchestration
(``run``, ``sweep``, ``engine``, its distributed set-up, its outputs). What belongs to no stage lives in the
shared core, ``mcpipe/*.py``, which imports no stage at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"mcpipe.extract": "extract", "mcpipe.cleaner": "cleaner", "mcpipe.finetune": "finetune",
           "mcpipe.store": "store", "mcpipe.report": "mcpipe/report", "mcpipe": "mcpipe"}

# a stage's own loop, set-up and outputs: no other stage (nor the report) may import these
ORCHESTRATION = {
    "mcpipe.extract.run", "mcpipe.extract.engine", "mcpipe.extract.distributed",
    "mcpipe.cleaner.run", "mcpipe.cleaner.sweep", "mcpipe.cleaner.outputs", "mcpipe.cleaner.auto",
    "mcpipe.cleaner.labelfile", "mcpipe.cleaner.prepare", "mcpipe.cleaner.inputs",
    "mcpipe.finetune.run", "mcpipe.finetune.loop", "mcpipe.finetune.train", "mcpipe.finetune.predict",
    "mcpipe.report.run",
}
# layer -> the layers it may import (its own always)
ALLOWED = {
    "core": set(),
    "store": {"core"},
    "extract": {"core", "store"},
    "cleaner": {"core", "store"},
    "finetune": {"core", "store", "extract", "cleaner"},
    "report": {"core", "store", "extract", "cleaner", "finetune"},
    "import": {"core", "store", "extract"},  # mcpipe/importer.py: `mcpipe import` writes stores
    "cli": {"core", "store", "extract", "cleaner", "finetune", "report", "import"},
}


def layer(module: str) -> str | None:
    """The layer of an mcpipe module name (None outside mcpipe)."""
    parts = module.split(".")
    if parts[0] != "mcpipe":
        return None
    if len(parts) == 1:
        return "core"  # the package: its version
    if parts[1] in ("cli", "__main__"):
        return "cli"
    if parts[1] == "importer":
        return "import"
    if parts[1] in ("extract", "cleaner", "finetune", "store", "report"):
        return parts[1]
    return "core"


def modules() -> dict[str, Path]:
    """Every mcpipe module name -> its file, from the folders the package maps (pyproject.toml)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("").parts
            if package == "mcpipe" and rel[0] == "report":
                continue  # listed under mcpipe.report
            name = ".".join((package, *rel)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(source: str, module: str) -> list[str]:
    """The mcpipe modules ``source`` imports (``from mcpipe.x import y`` counts y when it is a module)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                base = ".".join(module.split(".")[:-node.level] + ([node.module] if node.module else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return [m for m in out if m.startswith("mcpipe")]


def violations(sources: dict[str, str], known: set[str]) -> list[str]:
    """One line per import that breaks the layout; ``known``: every module name (to tell modules from names)."""
    found = []
    for module, source in sources.items():
        mine = layer(module)
        for target in imports(source, module):
            if target not in known:
                continue  # a name imported from a module, not a module
            theirs = layer(target)
            if theirs == mine:
                continue
            if theirs not in ALLOWED[mine]:
                found.append(f"{module} ({mine}) imports {target} ({theirs})")
            elif target in ORCHESTRATION and mine != "cli":
                found.append(f"{module} ({mine}) imports {target}, another stage's orchestration")
    return found


def test_every_import_follows_the_layout():
    mods = modules()
    assert {"mcpipe.cli", "mcpipe.extract.run", "mcpipe.finetune.run", "mcpipe.report.run"} <= mods.keys()
    sources = {name: path.read_text(encoding="utf-8") for name, path in mods.items()}
    assert violations(sources, set(mods)) == []


def test_the_check_finds_what_it_is_for():
    known = {"mcpipe.cleaner.sweep", "mcpipe.cleaner.model", "mcpipe.extract.run", "mcpipe.report.run",
             "mcpipe.finetune.run", "mcpipe.rundir", "mcpipe.store.reader"}
    planted = {
        "mcpipe.report.run": "from mcpipe.cleaner.sweep import align_columns\n",  # orchestration
        "mcpipe.finetune.run": "from mcpipe.cleaner import model\nimport mcpipe.extract.run\n",  # block ok, run not
        "mcpipe.rundir": "from mcpipe.store.reader import open_store\n",  # the core imports no stage
    }
    assert violations(planted, known) == [
        "mcpipe.report.run (report) imports mcpipe.cleaner.sweep, another stage's orchestration",
        "mcpipe.finetune.run (finetune) imports mcpipe.extract.run, another stage's orchestration",
        "mcpipe.rundir (core) imports mcpipe.store.reader (store)",
    ]
