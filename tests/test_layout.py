"""The package's architecture, checked: rooms by role, the site/server wall, public faces, module sizes, registries.

These are the rules a new engineer reads off the folder tree (README, "Layout"); a test keeps them true, because an
import that crosses the site/server wall is one line and easy to add by accident.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsi_fl"
ROOMS = ("cli", "mil", "evaluation", "federation", "site", "server", "privacy", "engines", "deploy", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """Every ``wsi_fl`` module ``path`` imports, at any depth of the file (function-level imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "wsi_fl"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "wsi_fl":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from wsi_fl.site import audit` names a module
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def _file(module: str) -> Path:
    rel = Path(*module.split("."))
    return ROOT / rel.with_suffix(".py") if (ROOT / rel.with_suffix(".py")).is_file() else ROOT / rel / "__init__.py"


def reachable(room: str) -> dict[str, str]:
    """Modules reachable from ``wsi_fl.<room>`` through wsi_fl imports -> the module that first imported each."""
    todo = [module_name(p) for p in (PACKAGE / room).rglob("*.py")]
    seen = dict.fromkeys(todo, "")
    while todo:
        current = todo.pop()
        for dep in internal_imports(_file(current)):
            if dep not in seen:
                seen[dep] = current
                todo.append(dep)
    return seen


@pytest.mark.parametrize(("room", "other"), [("site", "server"), ("server", "site")])
def test_site_and_server_never_import_each_other(room, other):
    crossing = {m: via for m, via in reachable(room).items() if m.startswith(f"wsi_fl.{other}")}
    assert not crossing, f"wsi_fl.{room} reaches wsi_fl.{other}: " + ", ".join(
        f"{via} -> {m}" for m, via in crossing.items())


@pytest.mark.parametrize(("entry", "other"),
                         [("wsi_fl.server.app", "wsi_fl.site"), ("wsi_fl.site.app", "wsi_fl.server")])
def test_loading_one_side_loads_nothing_of_the_other(entry, other):
    """The same wall at run time: what Flower loads for the ServerApp (or ClientApp) leaves the other side unloaded."""
    code = f"import sys, {entry}; print(sorted(m for m in sys.modules if m.startswith({other!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_has_a_docstring_and_a_small_public_face(room):
    package = importlib.import_module(f"wsi_fl.{room}")
    assert package.__doc__ and len(package.__doc__.split()) >= 10, f"wsi_fl.{room} says what lives there"
    if room == "cli":
        return  # the command line is its face
    assert 0 < len(package.__all__) <= 15
    for name in package.__all__:
        assert getattr(package, name) is not None, f"wsi_fl.{room}.{name}"


def test_the_package_is_rooms_not_a_flat_folder():
    # The main job (demo) and the project's exceptions (errors) serve every room.
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("_")
                   and p.name not in ("demo.py", "errors.py"))
    assert loose == [], f"modules outside a room: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(ROOMS)


def test_modules_and_scripts_stay_small():
    """~400 lines a module, ~250 a script (the issue's limits; TRIDENT's 1,800-line modules are what we avoid)."""
    big = [f"{p.relative_to(ROOT)}: {n}" for d in ("wsi_fl", "preprocessing", "models")
           for p in (ROOT / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400]
    big += [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / "scripts").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 250]
    assert not big, big


def test_no_script_or_test_reaches_into_sys_path():
    offenders = [str(p.relative_to(ROOT)) for d in ("scripts", "tests") for p in (ROOT / d).rglob("*.py")
                 if p != Path(__file__) and "sys.path" in p.read_text()]
    assert not offenders, offenders


def test_strategy_names_of_the_run_config_are_the_registry():
    """``StrategyName`` is what sites and the CLI accept without loading Flower's server; the registry builds them."""
    from wsi_fl.federation.config import StrategyName
    from wsi_fl.server.strategies import STRATEGIES

    assert sorted(get_args(StrategyName)) == STRATEGIES.names()


def test_one_registry_behind_models_encoders_and_strategies():
    from models.registry import MODELS
    from preprocessing.encoders import ENCODERS
    from wsi_fl._registry import Registry
    from wsi_fl.server.strategies import STRATEGIES

    for registry in (MODELS, ENCODERS, STRATEGIES):
        assert isinstance(registry, Registry) and len(registry) >= 2


def test_registry_refuses_a_second_name_and_lists_the_known_ones():
    from wsi_fl._registry import Registry, UnknownNameError

    reg: Registry = Registry("widget")
    reg.register("a")(len)
    reg.register("b")(abs)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(min)
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; registered: a, b") as err:
        reg.get("c")
    assert isinstance(err.value, ValueError) and isinstance(err.value, KeyError)
    assert reg.get("b") is abs and "a" in reg and list(reg) == ["a", "b"]
