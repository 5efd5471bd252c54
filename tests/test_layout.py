"""The repository's folders must never stand in for an installed package of the same name.

Python puts the current folder (or a script's folder, or pytest's test folder) first on sys.path, so a
folder with an __init__.py at the repository root would be imported instead of a package of that name
installed by pip: transformers' `from kernels import ...` would load llmq's kernels/ folder.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Where each way of running the project puts a repository folder first on sys.path:
# `python -m pytest`, `python -c` and `make` the repository root; `python scripts/x.py` scripts/;
# pytest's default import mode tests/.
PATH_ROOTS = [REPO, REPO / "scripts", REPO / "tests"]

_RESOLVE = textwrap.dedent("""
    import importlib.util, json, sys
    out = {}
    for name in sys.argv[1:]:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        out[name] = None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]
    print(json.dumps(out))
""")


def _importable_names(folder: Path) -> list[str]:
    names = []
    for p in folder.iterdir():
        name = p.stem if p.suffix == ".py" else p.name
        if p.is_symlink() or not name.isidentifier() or (p.is_file() and p.suffix != ".py") or name == "llmq":
            continue  # llmq itself is meant to be imported from the checkout
        names.append(name)
    return sorted(set(names))


def _resolve(names: list[str], cwd: Path, first_on_path: Path | None) -> dict:
    """find_spec of each name in a fresh interpreter; first_on_path plays sys.path[0]."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = _RESOLVE if first_on_path is None else f"import sys; sys.path.insert(0, {str(first_on_path)!r})\n" + _RESOLVE
    # -I would also drop site-packages; -P (3.11+) / -E alone keep them. Running from `cwd` with -c puts '' first.
    r = subprocess.run([sys.executable, "-E", "-c", code, *names], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("root", PATH_ROOTS, ids=lambda p: "root" if p == REPO else p.name)
def test_no_repository_folder_shadows_an_installed_package(root, tmp_path):
    names = _importable_names(root)
    elsewhere = _resolve(names, cwd=tmp_path, first_on_path=None)  # what is installed, seen from outside
    here = _resolve(names, cwd=root, first_on_path=root)
    shadowed = {n: (here[n], elsewhere[n]) for n in names if elsewhere[n] is not None and here[n] != elsewhere[n]}
    assert not shadowed, f"from {root} these names resolve to the repository instead of the installed package: {shadowed}"


def test_kernels_and_eval_are_plain_folders_reached_only_under_llmq():
    for folder in ("kernels", "eval"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would make {folder} a top-level package"
        link = REPO / "llmq" / folder
        assert link.is_symlink() and link.resolve() == (REPO / folder).resolve()
    # Seen from the repository root: llmq's subpackages are the repository's folders, and a top-level
    # `kernels`/`eval` is never a module of ours (at most an empty namespace when nothing is installed).
    got = _resolve(["llmq.kernels.dispatch", "llmq.eval.runner", "kernels", "eval"], cwd=REPO, first_on_path=REPO)
    assert Path(got["llmq.kernels.dispatch"][0]).resolve() == (REPO / "kernels" / "dispatch.py").resolve()
    assert Path(got["llmq.eval.runner"][0]).resolve() == (REPO / "eval" / "runner.py").resolve()
    for name in ("kernels", "eval"):
        if got[name] is not None:
            origin = got[name][0]
            assert origin is None or not Path(origin).resolve().is_relative_to(REPO.resolve()), (name, origin)


def test_transformers_finds_hugging_face_kernels_from_the_repository_root():
    pytest.importorskip("kernels")  # transformers >= 5.25 requires it; older ones may not have it installed
    r = subprocess.run([sys.executable, "-c", "from kernels import CUDAProperties; import kernels; print(kernels.__file__)"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).resolve().is_relative_to(REPO.resolve())
