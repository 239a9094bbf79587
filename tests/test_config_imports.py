"""The configuration and the method registry import each other in one direction only:
``comigs_dist.options`` <- ``config.schema`` <- ``config.users`` <- ``config.validation`` <-
``config.loading``; ``config.validation`` -> ``comigs_dist.methods`` -> ``comigs_dist.options``."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env

PKG = Path(__file__).resolve().parents[1] / "comigs_dist"
MODULES = ("comigs_dist.options", "comigs_dist.methods", "comigs_dist.config", "comigs_dist.model",
           "comigs_dist.train", "comigs_dist.main")


@pytest.mark.parametrize("first", MODULES)
def test_every_import_order_works_in_a_fresh_interpreter(first):
    """Importing any of these first, then the others, succeeds: a cycle between the registry and
    the config package would stop one order with a partially initialised module."""
    order = [first] + [m for m in MODULES if m != first]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"import order {order} failed:\n{proc.stderr[-3000:]}"


def test_options_alone_loads_nothing_else_of_the_project():
    """comigs_dist.options is independent of the project: importing it loads no other of its modules."""
    code = ("import sys, comigs_dist.options\n"
            "print(sorted(m for m in sys.modules if m.startswith('comigs_dist')))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "['comigs_dist', 'comigs_dist.options']"


def runtime_imports(path: Path, root: Path = PKG.parent) -> set[str]:
    """Every module (and ``module.name``) a file imports when it runs, at module level or inside
    functions, leaving out ``if TYPE_CHECKING:`` blocks; relative imports are resolved against the
    file's package under ``root``."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def _project(imports: set[str], prefix: str) -> set[str]:
    return {m for m in imports if m == prefix or m.startswith(prefix + ".")}


def test_the_import_graph_has_one_direction():
    """Methods never import the config package (only under TYPE_CHECKING); options imports nothing
    of the project; the schema imports only options; validation is the one config module that
    imports the method registry."""
    for path in sorted((PKG / "methods").glob("*.py")):
        assert not _project(runtime_imports(path), "comigs_dist.config"), f"{path.name} imports comigs_dist.config"
    assert not _project(runtime_imports(PKG / "options.py"), "comigs_dist")
    assert _project(runtime_imports(PKG / "config" / "schema.py"), "comigs_dist") <= {"comigs_dist.options",
                                                                                     "comigs_dist.options.OptionsError",
                                                                                     "comigs_dist.options.opt",
                                                                                     "comigs_dist.options.sub"}
    takers = {p.name for p in (PKG / "config").glob("*.py") if _project(runtime_imports(p), "comigs_dist.methods")}
    assert takers == {"validation.py"}


def test_the_graph_check_sees_a_hidden_import(tmp_path):
    """The static check catches what the old layout did: the config imported inside a function
    (and at module level); an import under TYPE_CHECKING is not counted."""
    probe = tmp_path / "comigs_dist" / "methods" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from comigs_dist.config.users import UserSpec\n"
                     "from ..options import opt\n"
                     "def f(cfg):\n    from comigs_dist.config import method_options_of\n"
                     "    return method_options_of(cfg)\n")
    found = runtime_imports(probe, tmp_path)
    assert _project(found, "comigs_dist.config") == {"comigs_dist.config", "comigs_dist.config.method_options_of"}
    assert "comigs_dist.options.opt" in found
