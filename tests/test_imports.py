"""The package's import graph has no cycle, counting imports inside functions and the backend registry's."""
import ast
from pathlib import Path

from vrepa_kernels import backends

PACKAGE = Path(backends.__file__).resolve().parents[1]
ROOT = PACKAGE.name


def _modules():
    """Dotted name -> (path, is_package) of every Python module in the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def import_graph():
    """Module -> set of package modules it imports: explicit imports anywhere in the file (functions too),
    not the implicit import of a module's own parent packages."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base not in ancestors:
                    targets.append(base)
                targets += [f"{base}.{alias.name}" for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    # The registry imports backend modules by name (importlib).
    graph[f"{ROOT}.backends"] |= {f"{ROOT}.backends.{b.module}" for b in backends.REGISTRY.values()}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walker_sees_function_level_and_registry_imports():
    graph = import_graph()
    assert f"{ROOT}.backends.triton_backend" in graph[f"{ROOT}.backends"]  # imported inside a function
    assert f"{ROOT}.backends.torch_backend" in graph[f"{ROOT}.backends"]  # through the registry
    assert f"{ROOT}.op" in graph[f"{ROOT}.api"] and f"{ROOT}.features" in graph[f"{ROOT}.op"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
