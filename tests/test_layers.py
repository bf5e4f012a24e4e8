"""The flow runs one way: a lower layer never imports a higher one, and no module hides an import in a function
(outside the CLI, which imports lazily to start fast) — such an import is how a cycle hides."""

import ast
from pathlib import Path

import stainmil

PACKAGE = Path(stainmil.__file__).parent
# lowest first; a module may import its own layer and those below it (see the README's picture)
LAYERS = [
    ("base", ["", "io", "errors", "progress", "device", "tables", "cores"]),
    ("config", ["config"]),
    ("launch", ["launch"]),
    ("stats", ["stats"]),
    ("slides", ["slides"]),
    ("data", ["data"]),
    ("features", ["features"]),
    ("bags", ["data.bags"]),
    ("model", ["model"]),
    ("train", ["train"]),
    ("evaluate", ["evaluate"]),
    ("analysis", ["analysis"]),
    ("experiments", ["experiments"]),
    ("pipeline", ["pipeline", "bench", "bench_scale", "bench_feed"]),
    ("cli", ["cli", "__main__"]),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of ``stainmil.<module>`` (the longest matching prefix wins: data.bags over data)."""
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


def test_importing_the_model_does_not_pull_in_the_data_stack():
    import subprocess
    import sys

    code = ("import sys; import stainmil.model.registry; "
            "print(','.join(m for m in ('pandas', 'h5py', 'openslide', 'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing the model loads {loaded}"


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
