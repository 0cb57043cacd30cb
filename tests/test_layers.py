"""The house rule: each layer of the package imports only layers below it (and itself)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lavie_jax"

# bottom to top; a module may import modules of its own layer or of the layers before it
LAYERS = (
    ("foundations", ("runtime", "cli", "stages", "parallel", "diffusion")),
    ("models", ("models",)),
    ("io", ("io",)),
    ("convert, data", ("convert", "data")),
    ("sampling", ("sampling",)),
    ("evaluation", ("evaluation",)),
    ("training", ("train",)),
    ("demo", ("demo",)),
)
LEVEL = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """`lavie_jax.models.unet` -> 'models'; `lavie_jax.stages` -> 'stages'."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lavie_jax."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "lavie_jax":
            found.update(f"lavie_jax.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lavie_jax."))
    return found


def test_imports_only_go_down():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        unit = parts[1]
        assert unit in LEVEL, f"{rel}: not in the layer table of this test; add it to LAYERS"
        for module in _imports(path):
            target = _unit(module)
            if LEVEL[target] > LEVEL[unit]:
                bad.append(f"{rel} ({LAYERS[LEVEL[unit]][0]}) imports {module} ({LAYERS[LEVEL[target]][0]})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_the_package_root_holds_only_layers():
    """Every module sits in the folder of its layer: the package root holds `__init__.py` and folders only."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules loose at the package root (move each into its layer's folder): {loose}"
