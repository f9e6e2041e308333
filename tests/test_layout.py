"""The package's shape: folders import downward only (run -> training, data, models -> storage, errors), no
module imports another that imports it back (imports inside functions count), and every user-facing exception
derives from errors.InputError. Read from the source, nothing is imported but the error classes."""
import ast
import importlib
import inspect
import pathlib
import pkgutil

import flax_bert

PACKAGE = pathlib.Path(flax_bert.__file__).parent
# A folder may import from folders of a lower level only; the command-line modules at the top import anything.
# finetune sits above run (it reads run directories) and below the command line.
LEVEL = {"errors": 0, "storage": 1, "models": 2, "data": 2, "training": 2, "run": 3, "finetune": 3.5,
         "cli": 4, "bench": 4, "tpu_compile": 4, "fill_mask": 4, "plot": 4, "__init__": 4}
# Within level 2, the layers that a layer may lean on: training runs models; data never touches model code.
MAY_IMPORT = {"training": {"models"}, "data": set(), "models": set()}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: pathlib.Path) -> set[str]:
    """Every flax_bert module this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("flax_bert")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flax_bert"):
            for alias in node.names:  # `from flax_bert.data import corpus` imports the module flax_bert.data.corpus
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                          else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): project_imports(path) for path in PACKAGE.rglob("*.py")}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_folders_import_downward_only():
    wrong = []
    for module, imports in import_graph().items():
        for target in imports:
            source_area, target_area = area(module), area(target)
            if source_area == target_area or target == "flax_bert":
                continue
            sideways = LEVEL[target_area] == LEVEL[source_area] and source_area in MAY_IMPORT
            if LEVEL[target_area] > LEVEL[source_area] or (sideways and target_area not in MAY_IMPORT[source_area]):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = import_graph()
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == module or target == "flax_bert" or target.endswith(".__init__"):
                continue
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_errors_imports_nothing_from_the_project():
    assert project_imports(PACKAGE / "errors.py") == set()


def test_every_project_exception_is_an_input_error():
    from flax_bert.errors import InputError

    outside = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="flax_bert."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == info.name and not issubclass(cls, InputError):
                outside.append(f"{info.name}.{cls.__name__}")
    assert not outside, "user-facing exceptions outside errors.InputError: " + ", ".join(outside)
