"""The house: the top level holds the papers' concepts (the reading floor), the machinery lives one floor down
(engine/), the study in study/; concepts never import the engine, the engine never imports train.py, and the
import graph has no cycle. Read from the source files' import statements (ast), nothing imported."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READING_FLOOR = {"model", "attention", "sampler", "envs", "rollout", "reward", "grpo", "paw", "rwml", "spa", "train",
                 "multihost"}
MAX_LINES = 600


def project_modules() -> dict[str, Path]:
    """module name -> file, for the reading floor (envs is a package) and the engine."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in ("envs", "engine"):
        for path in (ROOT / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (`from engine import hf` is engine.hf; `import envs.grid` is envs.grid)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found |= submodules or {node.module}  # `from engine import hf` imports engine.hf
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def floor(module: str) -> str:
    return "engine" if module.startswith("engine") else "reading"


def test_the_top_level_holds_only_the_reading_floor_and_no_run_records():
    assert {path.stem for path in ROOT.glob("*.py")} == READING_FLOOR - {"envs"}
    assert (ROOT / "envs" / "__init__.py").exists()
    assert not (ROOT / "runs").exists() or not any(
        (ROOT / "runs").iterdir()), "run records belong under study/runs (a run's own folder is git-ignored)"


def test_every_module_outside_the_tests_is_at_most_600_lines():
    long = {str(path.relative_to(ROOT)): n for path in ROOT.rglob("*.py")
            if "tests" not in path.parts and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_grpo_is_maths_over_arrays_and_reaches_no_environment():
    assert graph()["grpo"] & {"rollout", "sampler", "multihost", "envs"} == set()


def test_only_train_py_imports_the_engine_and_the_engine_never_imports_train_py():
    edges = graph()
    assert {module for module, targets in edges.items()
            if floor(module) == "reading" and any(floor(t) == "engine" for t in targets)} == {"train"}
    assert {module for module, targets in edges.items() if floor(module) == "engine" and "train" in targets} == set()


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_notebooks_import_only_the_reading_floor_and_the_engines_public_entry():
    allowed = READING_FLOOR | {"engine"}
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
        tree = ast.parse("\n".join(cells))
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        project = {m for m in modules if m.split(".")[0] in set(project_modules()) | {"experiment", "settings"}}
        assert project <= allowed, (notebook.name, project - allowed)
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and isinstance(node.value, ast.Name) and node.value.id in ("engine", "train")}
        assert attributes <= {"prepare", "Args", "settle", "override", "main", "__file__"}, (notebook.name, attributes)
