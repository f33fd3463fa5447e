"""The package's layout at a glance: module sizes, the longest functions, and import cycles.

    python utils/check_layout.py            # table of modules and the longest functions
    python utils/check_layout.py --check    # exit 1 on an import cycle inside the package or a
                                            # function over --max-lines lines of logic

Imports inside functions count for cycles too: two modules that import each other lazily still
cannot be understood or moved one without the other. Lines of logic exclude the signature, the docstring, blank lines and
comments.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transformers_tempo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Package modules this module imports, at module level or inside functions (a lazy import
    both ways is still a circle: each module needs the other), `if TYPE_CHECKING:` excepted."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node):
            if isinstance(child, ast.ImportFrom) and child.level:
                base = package
                for _ in range(child.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{child.module}" if child.module else base
                found.add(target)
                if not child.module:  # from . import x: x may be a module
                    found.update(f"{base}.{alias.name}" for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("transformers_tempo"):
                found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("transformers_tempo"))
    return found


def logic_lines(node: ast.FunctionDef, source_lines: list[str]) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    count = 0
    for line in source_lines[body[0].lineno - 1 : node.end_lineno]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            count += 1
    return count


def functions(tree: ast.Module, source: str, module: str):
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{module}.{node.name}", logic_lines(node, lines)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--max-lines", type=int, default=100)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    graph, sizes, lengths = {}, {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        name = module_name(path)
        graph[name] = package_imports(tree, name, path.name == "__init__.py") - {name}
        sizes[name] = len(source.splitlines())
        lengths.extend(functions(tree, source, name))
    print("| module | lines |\n| --- | --- |")
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"| {name} | {size} |")
    print("\n| longest functions | lines of logic |\n| --- | --- |")
    for name, count in sorted(lengths, key=lambda item: -item[1])[: args.top]:
        print(f"| {name} | {count} |")
    cycles = find_cycles(graph)
    print("\nimport cycles:", "none" if not cycles else "")
    for cycle in cycles:
        print("  " + " -> ".join(cycle))
    too_long = [(n, c) for n, c in lengths if c > args.max_lines]
    if args.check and (cycles or too_long):
        for name, count in too_long:
            print(f"too long: {name} has {count} lines of logic (limit {args.max_lines})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
