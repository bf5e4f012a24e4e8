"""The flow runs one way: a lower layer never imports a higher one, and no module hides an import in a function
(outside the CLI, which imports lazily to start fast) — such an import is how a cycle hides."""

import ast
from pathlib import Path

import stainmil

PACKAGE = Path(stainmil.__file__).parent
# lowest first; a module may import its own layer and those below it (see the README's picture)
LAYERS = [
    ("base", ["", "io", "errors", "progress", "device", "tables", "cores", "locks", "stopping", "run_files"]),
    ("config", ["config", "classes"]),
    ("launch", ["launch"]),
    ("stats", ["stats"]),
    ("slides", ["slides"]),
    ("data", ["data"]),
    ("features", ["features"]),
    ("model", ["model"]),  # torch only: its input CaseBatch is defined here, not by the data layers
    ("bags", ["bags"]),    # batches of cases drawn from the store (features) into the model's CaseBatch
    ("train", ["train"]),
    ("evaluate", ["evaluate"]),
    ("analysis", ["analysis"]),
    ("experiments", ["experiments"]),
    ("pipeline", ["pipeline", "bench", "check"]),
    ("view", ["view"]),    # reads run folders (analysis tables, registrations, slides); nothing imports it
    ("cli", ["cli", "cli_modes", "__main__"]),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of ``stainmil.<module>`` (the longest matching prefix wins)."""
    name = module.removeprefix("stainmil").lstrip(".")
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or (prefix and name.startswith(prefix + "."))) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"stainmil.{name} is in no layer; add it to LAYERS"
    return best


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def stainmil_imports(tree: ast.AST):
    """(imported module, line, inside a function?, inside `if TYPE_CHECKING`?) for every import of stainmil."""
    def walk(node, in_function, type_checking):
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("stainmil"):
                yield child.module, child.lineno, in_function, type_checking
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("stainmil"):
                        yield alias.name, child.lineno, in_function, type_checking
            yield from walk(child, func, checking)
    yield from walk(tree, False, False)


def test_every_module_has_a_layer():
    for module, _ in modules():
        layer_of(module)


def test_no_lower_layer_imports_a_higher_one():
    upward = []
    for module, path in modules():
        own = layer_of(module)
        for imported, line, _, _ in stainmil_imports(ast.parse(path.read_text())):
            if layer_of(imported) > own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]}) at line {line}")
    assert not upward, "\n".join(upward)


def test_no_function_level_imports_of_stainmil_outside_the_cli():
    hidden = []
    for module, path in modules():
        if layer_of(module) == len(LAYERS) - 1:
            continue
        for imported, line, in_function, type_checking in stainmil_imports(ast.parse(path.read_text())):
            if in_function and not type_checking:
                hidden.append(f"{module} imports {imported} inside a function at line {line}")
    assert not hidden, "\n".join(hidden)


FORBIDDEN_IN_MODEL = ("pandas", "h5py", "openslide", "matplotlib")


def module_level_imports(path: Path) -> set[str]:
    """Every module imported at module level by the file (functions excluded; ``if TYPE_CHECKING`` excluded)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def test_the_model_layer_stands_alone():
    """Every ``stainmil.model.*`` module — with everything of stainmil it imports, followed through — imports
    neither the data stack (pandas, h5py, OpenSlide, matplotlib) nor anything of ``stainmil.data``; and the whole
    package, imported in a fresh interpreter, loads none of the data stack (third-party imports included)."""
    import subprocess
    import sys

    files = dict(modules())
    bad = {}
    for start in [m for m in files if m == "stainmil.model" or m.startswith("stainmil.model.")]:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module in seen or module not in files:
                continue
            seen.add(module)
            for imported in module_level_imports(files[module]):
                if imported.split(".")[0] in FORBIDDEN_IN_MODEL or imported.startswith("stainmil.data"):
                    bad.setdefault(start, set()).add(f"{imported} (via {module})")
                elif imported.startswith("stainmil"):
                    todo.append(imported)
    assert not bad, f"model modules that reach the data stack: {bad}"

    code = ("import sys; import stainmil.model, stainmil.model.registry; print(','.join(m for m in sys.modules "
            f"if m.split('.')[0] in {FORBIDDEN_IN_MODEL!r} or m.startswith('stainmil.data')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing the model loads {loaded}"


def test_no_architecture_name_is_compared_outside_the_registry():
    """What an architecture can do is a capability of its registry entry (``needs_registration``,
    ``patch_attention``, ``stain_specific``), never ``architecture == "aligned"`` in the code that uses it."""
    from stainmil.model.registry import list_architectures

    names = set(list_architectures())
    found = []
    for module, path in modules():
        if module.startswith("stainmil.model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for op in node.ops):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in names and "architecture" in ast.unparse(node):
                        found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_importing_the_library_leaves_the_matplotlib_backend_alone():
    import subprocess
    import sys

    code = ("import sys, matplotlib; matplotlib.use('pdf'); import stainmil.train.trainer, stainmil.analysis.analyze, "
            "stainmil.experiments.tune; print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["pdf", "False"]


def test_tiling_and_registering_do_not_load_the_deep_learning_stack():
    """`stainmil tile` and `stainmil register` on a whole cohort: their memory is the slides', not torch's
    (~800 MB of RSS before a slide is opened)."""
    import subprocess
    import sys

    code = ("import sys; import stainmil.data.slide_route, stainmil.data.registration, stainmil.data.serial_wsi; "
            "print(','.join(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"tiling/registering loads {loaded}"
