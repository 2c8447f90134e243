"""Packaging guards: pyproject declares compatible ranges, constraints.txt pins what the tests were
measured on, and the Docker image's install step keeps the container's torch, Triton, apex and
Transformer Engine. A built wheel, installed (not editable) in a fresh virtualenv, trains from any
directory: the config groups ship inside the package.

test_docker_install_keeps_container_packages needs the network (PyPI): pip's resolver downloads
package metadata. It is marked `network`; everything else reads files only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import tomllib  # Python >= 3.11 (requires-python)

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DOCKERFILE = ROOT / "Dockerfile"

# What the GPU image must never replace, and what stands in for NVIDIA's PyTorch 25.10 container.
# NGC's torch carries a pre-release + local version (2.11.0a0+<git>.nv25.10): it is not `>= 2.11`,
# so any dependency asking for `torch>=2.11` would make pip replace it. The stand-in uses that form.
KEPT = ("torch", "triton", "apex", "transformer-engine", "flash-attn")
CONTAINER = {
    "torch": "2.11.0a0+145a3a7bda.nv25.10",
    "triton": "3.6.0",
    "apex": "0.1",
    "transformer_engine": "2.8.0+40c69e75",
}
# The stand-in torch declares torch 2.11.0's own requirements (PyPI's metadata, less the CUDA wheels,
# which the container provides outside pip): pip checks an installed torch's requirements too, and
# `setuptools<82` there rules out constraints.txt's setuptools pin inside the image.
TORCH_REQUIRES = [
    "filelock", "typing-extensions>=4.10.0", "setuptools<82", "sympy>=1.13.3", "networkx>=2.5.1",
    "jinja2", "fsspec>=0.8.5", 'triton==3.6.0; platform_system == "Linux"',
]
# The Dockerfile's filter, applied here the same way (the test checks the Dockerfile still says it).
DOCKER_FILTER = "grep -vE '^(torch|triton|nvidia-|setuptools)' constraints.txt"
DOCKER_DROP = re.compile(r"^(torch|triton|nvidia-|setuptools)")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _constraint_lines(path: Path = CONSTRAINTS) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in _constraint_lines():
        req = Requirement(line)
        (spec,) = req.specifier
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _is_kept(name: str) -> bool:
    name = canonicalize_name(name)
    return name in KEPT or name.startswith(("nvidia-", "cuda-"))


def _project_copy(tmp_path: Path) -> Path:
    """What a build reads, copied out of the work tree (whose build/ folder may hold stale files)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pretrain", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return src


def test_base_dependencies_are_ranges_without_torch_or_triton():
    project = _pyproject()["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    names = [canonicalize_name(r.name) for r in base]
    forbidden = [n for n in names if _is_kept(n)]
    assert not forbidden, (
        f"pyproject base dependencies name {forbidden}: the GPU image's own builds must not be "
        "replaced; put torch/triton in an extra (`torch`, `cpu`) and the exact version in constraints.txt"
    )
    for req in base:
        ops = {spec.operator for spec in req.specifier}
        assert "==" not in ops and "===" not in ops, (
            f"{req}: pin exact versions in constraints.txt, declare a compatible range here"
        )
        assert ops & {">=", ">", "~="} and ops & {"<", "~="}, (
            f"{req}: give a lower bound (tested or image version) and an upper bound (next major/minor)"
        )
    extras = project["optional-dependencies"]
    assert "triton" in {canonicalize_name(Requirement(r).name) for r in extras["cpu"]}, (
        "the `cpu` extra must bring the triton package (its interpreter runs kernels/ on CPU)"
    )


def test_constraints_are_exact_pins_admitted_by_pyproject():
    seen: dict[str, str] = {}
    for line in _constraint_lines():
        req = Requirement(line)
        specs = list(req.specifier)
        assert (
            not req.extras and req.marker is None and req.url is None
            and len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
        ), f"constraints.txt: {line!r} is not `name==version`"
        name = canonicalize_name(req.name)
        assert name not in seen, f"constraints.txt pins {name} twice ({seen[name]!r}, {line!r})"
        assert name != "pretrain", "constraints.txt must not pin the project itself"
        seen[name] = line
    pins = _pins()
    project = _pyproject()["project"]
    declared = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        declared += group
    problems = []
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not pinned in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: does not admit constraints.txt's {name}=={pins[name]}")
    assert not problems, "\n".join(problems)


def _fake_dist(site: Path, name: str, version: str, requires: list[str] = ()) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.network
@pytest.mark.parametrize("ngc_pins", [True, False], ids=["ngc-pip-constraint", "no-pip-constraint"])
def test_docker_install_keeps_container_packages(tmp_path, ngc_pins):
    """Needs the network (PyPI): resolves the Dockerfile's install step with pip's resolver.

    A throwaway venv stands in for the container: fake installed torch (NGC's version form
    2.11.0a0+<git>.nv25.10, with torch 2.11.0's requirements), triton 3.6.0, apex and Transformer
    Engine; with `ngc_pins`, an NGC-style PIP_CONSTRAINT file pins them (NGC images since 25.03 set
    one), without it nothing but our own constraints holds them in place. `pip install --dry-run
    --report` of the project with constraints.txt filtered as the Dockerfile does must install none
    of them, nor any nvidia-* / cuda-* package.
    """
    docker = DOCKERFILE.read_text()
    assert DOCKER_FILTER in docker and "-c /tmp/constraints.txt" in docker, (
        "the Dockerfile's install step changed: update this test's copy of its filter"
    )

    env_dir = tmp_path / "container"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    for name, version in CONTAINER.items():
        _fake_dist(site, name, version, TORCH_REQUIRES if name == "torch" else [])
    ngc_constraints = tmp_path / "ngc-constraint.txt"
    ngc_constraints.write_text("".join(f"{n}=={v}\n" for n, v in CONTAINER.items()))

    # The Dockerfile's two filters: torch/triton/nvidia-*, then whatever the container pins.
    ngc_names = {canonicalize_name(n) for n in CONTAINER} if ngc_pins else set()
    ours = [
        line for line in CONSTRAINTS.read_text().splitlines()
        if not DOCKER_DROP.match(line)
        and canonicalize_name(line.split("==")[0]) not in ngc_names
    ]
    filtered = tmp_path / "constraints.txt"
    filtered.write_text("\n".join(ours) + "\n")

    src = _project_copy(tmp_path)  # build the project's metadata outside the shared work tree

    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    env.pop("PIP_CONSTRAINT", None)
    if ngc_pins:
        env["PIP_CONSTRAINT"] = str(ngc_constraints)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
         "--report", str(report), "-c", str(filtered), str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    # (the machine's pip configuration may add local indexes: drop their "Location ... ignored" noise)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "is ignored:" not in line)
    assert proc.returncode == 0, f"pip could not resolve the image's install step:\n{errors[-4000:]}"
    install = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    replaced = {n: v for n, v in install.items() if _is_kept(n)}
    assert not replaced, f"the image's install step would replace container packages: {replaced}"
    assert "pretrain" in install
    pins = _pins()
    for name in ("megatron-core", "deepspeed", "transformers"):
        assert Version(install[name]) == pins[name], (name, install[name])


def test_a_built_wheel_trains_from_an_unrelated_directory(tmp_path):
    """pip wheel, install it (not editable) into a new virtualenv, run 3 steps of the default config
    (built-in corpus, tiny GPT) with the console script, from a directory that is not the checkout.

    The new virtualenv takes the already installed dependencies through a path entry to this
    environment's site-packages (a .pth file: plain paths, so this environment's editable install of
    the project is not activated there); no package is downloaded. Reading the project's own code
    from the checkout instead of the wheel would show in ``pretrain.__file__``.
    """
    import site
    import sysconfig

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(_project_copy(tmp_path))], check=True, capture_output=True, text=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (target / "project_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    wheel = next(wheels.glob("pretrain-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    where = subprocess.run([str(python), "-c", "import pretrain; print(pretrain.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(target) in where and str(ROOT) not in where, where
    shipped = {p.relative_to(target).as_posix() for p in (target / "pretrain" / "conf").rglob("*.yaml")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pretrain" / "conf").rglob("*.yaml")}
    assert shipped == source, f"config files missing from the wheel (list their folder in pyproject): {source - shipped}"
    proc = subprocess.run([str(venv / "bin" / "pretrain-train"), "trainer.max_steps=3", "trainer.progress_bar=false",
                           "trainer.eval_interval=0", "logging.wandb=false", "logging.plot=false", "hydra.run.dir=run"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    help_text = subprocess.run([str(venv / "bin" / "pretrain-data"), "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "data: builtin" in help_text.stdout, help_text.stdout[-2000:]
    for script in ("pretrain-export", "pretrain-reshard", "pretrain-generate", "pretrain-import-hf"):
        shown = subprocess.run([str(venv / "bin" / script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (script, shown.stderr[-2000:])


def test_every_package_folder_is_listed():
    """A folder of modules left out of [tool.setuptools] packages is missing from the wheel (its
    imports fail only once installed)."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pretrain").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
