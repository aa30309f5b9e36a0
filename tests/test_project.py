"""Project hygiene that no unit test of the library sees: dvc.yaml deps against what each stage
really imports, config defaults against params.yaml, `--help` on every entry point, the README."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elmm.config import Params, to_dict

ROOT = Path(__file__).resolve().parents[1]
SRC, STAGES = ROOT / "src", ROOT / "stages"
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The project file of a dotted module name (`elmm.kg.format`, or a stage helper `_common`)."""
    for base in (SRC, STAGES):
        path = base.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _imports(path: Path):
    """Every module name `path` imports, at any depth (lazy imports inside functions too)."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1]) if path.is_relative_to(SRC) else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_closure(script: Path) -> set[Path]:
    """`script` and every project file it imports, transitively (package __init__ files included)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def _trivial_init(path: Path) -> bool:
    """An __init__.py of docstring and constants only changes no stage's behaviour."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, (ast.Expr, ast.Assign)) for n in body)


def _code_deps(stage: dict) -> set[Path]:
    """The .py files a stage's deps name (directories expanded)."""
    files: set[Path] = set()
    for dep in stage.get("deps", []):
        path = ROOT / (dep if isinstance(dep, str) else next(iter(dep)))
        if path.is_dir():
            files |= set(path.rglob("*.py"))
        elif path.suffix == ".py":
            files.add(path)
    return {f for f in files if "__pycache__" not in f.parts}


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_deps_are_exactly_its_import_closure(name: str) -> None:
    """A change to any module a stage imports reruns it, and a change elsewhere does not."""
    stage = PIPELINE[name]
    scripts = [ROOT / w for w in stage["cmd"].split() if w.endswith(".py")]
    assert scripts, f"{name}: no python script in its cmd"
    closure = set().union(*(import_closure(s) for s in scripts))
    needed = {f for f in closure if not _trivial_init(f)}
    listed = {f for f in _code_deps(stage) if not _trivial_init(f)}
    rel = lambda files: sorted(str(f.relative_to(ROOT)) for f in files)  # noqa: E731
    assert not needed - listed, f"dvc.yaml stage {name!r} misses deps it imports: {rel(needed - listed)}"
    assert not listed - needed, f"dvc.yaml stage {name!r} lists code it never imports: {rel(listed - needed)}"


@pytest.mark.parametrize("script", sorted(STAGES.glob("[!_]*.py")), ids=lambda p: p.stem)
def test_stages_import_common_before_the_library(script: Path) -> None:
    """`_common` puts this checkout's src/ first on sys.path; an `elmm` import before it would load the
    package from wherever `pip install -e` points (another checkout's code in a queued experiment)."""
    order = []
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Import):
            order += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            order.append(node.module.split(".")[0])
    assert "_common" in order, script
    assert "elmm" not in order[: order.index("_common")], f"{script.name} imports elmm before _common"


def test_evaluate_does_not_import_the_training_loop() -> None:
    assert SRC / "elmm" / "training.py" not in import_closure(STAGES / "evaluate.py")


def test_config_defaults_agree_with_params_yaml() -> None:
    """params.yaml is the documented default: every key and value equals the schema's default."""
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == to_dict(Params())


def test_train_depends_on_every_model_param_it_builds_from() -> None:
    """The train stage builds its model from every `model.*` key but the backbone's (which reach it
    through data/backbone): a key missing from its params lets DVC restore another run's outputs
    from the run cache (model.entity_token_dropout was, until caught by its queued runs' metrics
    equalling the baseline's)."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    declared = {p for p in stage["params"] if isinstance(p, str)}
    model_keys = set(yaml.safe_load((ROOT / "params.yaml").read_text())["model"]) - {"backbone", "tiny"}
    missing = {k for k in model_keys if f"model.{k}" not in declared and "model" not in declared}
    assert not missing, f"dvc.yaml's train stage lacks params {sorted(missing)}"


def _entry_points() -> list[list[str]]:
    stages = [[sys.executable, str(s)] for s in sorted(STAGES.glob("[!_]*.py"))]
    modules = [[sys.executable, "-m", m]
               for m in ("elmm.experiments", "elmm.predict", "elmm.param_count", "elmm.kge", "elmm.token_probe")]
    return stages + modules


@pytest.mark.parametrize("cmd", _entry_points(), ids=lambda c: Path(c[-1]).stem)
def test_help_exits_zero_and_writes_nothing(cmd: list[str], tmp_path: Path) -> None:
    """`--help` answers through argparse and runs nothing: the (empty) working directory stays empty."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([*cmd, "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    assert list(tmp_path.iterdir()) == []
    if cmd[1] != "-m":  # a stage: its help says what it reads and writes (from dvc.yaml)
        assert "reads:" in proc.stdout and "writes:" in proc.stdout and "params:" in proc.stdout


def test_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1]
    modules = sorted(p.relative_to(SRC / "elmm") for p in (SRC / "elmm").rglob("*.py") if p.name != "__init__.py")
    missing = [str(m) for m in modules if not re.search(rf"\b{re.escape(m.name)}\b", layout)]
    assert not missing, f"README's Layout section does not name {missing}"
    for folder in ("stages/", "benchmarks/", "docs/", "tests/", "metrics/"):
        assert folder in layout, folder

