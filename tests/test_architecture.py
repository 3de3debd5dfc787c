"""The layering docs/ARCHITECTURE.md promises, checked against the code: no import cycle
between deltaxfer's modules (module-level and lazy imports inside functions alike), every
module of the package named in the layers table, and the commands thin: `send`, `serve`
and `migrate` write no protocol message themselves (that is sender.py's and receiver.py's)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "deltaxfer"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["deltaxfer", *parts])] = p
    return out


def _resolve(name: str, mods: dict) -> str | None:
    """The deltaxfer module an imported name lands in (a package's attribute import of a
    submodule counts as that submodule)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, mods: dict) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("deltaxfer"):
                    out.add(_resolve(a.name, mods))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("deltaxfer"):
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                out.add(full if full in mods else _resolve(target, mods))
    out.discard(None)
    out.discard(mod)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {}
    for m, p in mods.items():
        # a package's __init__ importing its own submodules is not a layer crossing
        g[m] = {d for d in imports_of(m, p, mods) if not d.startswith(m + ".")}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(n):
        colour[n] = GREY
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if colour.get(d, BLACK) == GREY:
                return stack[stack.index(d):] + [d]
            if colour.get(d) == WHITE:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(g):
        if colour[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_lazy_imports_included():
    g = graph()
    assert "deltaxfer.sender" in g and "deltaxfer.receiver" in g
    # packages re-export their submodules; an edge into a package is an edge into it
    cycle = find_cycle({m: {d for d in ds} for m, ds in g.items()})
    assert cycle is None, " -> ".join(cycle)


def test_every_module_is_in_the_layers_table():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Layers"):text.index("## A page's way")]
    first_cells = [ln.split("|")[1] for ln in table.splitlines() if ln.startswith("| `")]
    named = set()
    for cell in first_cells:
        for group, members in re.findall(r"`([\w/]+)`(?: \(([^)]*)\))?", cell):
            group = group.strip("/")
            named.add(group)
            for m in re.findall(r"`([\w/]+)`", members or ""):
                named.add(f"{group}.{m.strip('/')}")
    missing = []
    for m in modules():
        short = m.removeprefix("deltaxfer").removeprefix(".")
        if not short or short == "__main__":
            continue
        parts = short.split(".")
        # a module is named itself, or inside a named sub-package (core.reference.*);
        # wire/'s modules are listed in its role column
        if short in named or any(".".join(parts[:k]) in named for k in range(2, len(parts))) \
                or (parts[0] == "wire" and "wire" in named):
            continue
        missing.append(short)
    assert missing == [], f"modules not in docs/ARCHITECTURE.md's layers table: {missing}"


def _protocol_writes(path: Path) -> list[str]:
    """Calls that write a protocol message: conn.send_control(...) / conn.send(MsgType...)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("send_control", "send", "recv_control"):
            if node.args and isinstance(node.args[0], ast.Attribute) \
                    and isinstance(node.args[0].value, ast.Name) \
                    and node.args[0].value.id == "MsgType":
                out.append(f"{path.name}:{node.lineno} {node.func.attr}({node.args[0].attr})")
    return out


def test_commands_write_no_protocol_messages():
    for name in ("send.py", "serve.py", "migrate.py", "migrate_runc.py"):
        assert _protocol_writes(PKG / name) == [], name
    # and the checker sees them where they are
    assert any("BEGIN" in w for w in _protocol_writes(PKG / "sender.py"))
    assert any("STATE" in w for w in _protocol_writes(PKG / "receiver.py"))
