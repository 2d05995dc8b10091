"""Packaging: dependencies declared as pinned, only the library installed, the laptop-side launch wrapper without
JAX, and no "PyTorch was not found" advisory from transformers on our runs."""
import os
import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: hide the top-level packages named in argv[1] (comma-separated) as if they were not
# installed (no import spec, no distribution metadata), then run the rest of argv as `python -m` / `-c`.
HIDE = r"""
import runpy, sys
hidden = set(sys.argv[1].split(","))
original = list(sys.meta_path)

class Hide:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in hidden:
      return None
    for finder in original:
      spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
      if spec is not None:
        return spec
    return None

  def find_distributions(self, *args, **kwargs):
    for finder in original:
      for dist in getattr(finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
        if dist.metadata["Name"].lower().replace("-", "_") not in hidden:
          yield dist

sys.meta_path[:] = [Hide()]
if sys.argv[2] == "-m":
  sys.argv = [sys.argv[3], *sys.argv[4:]]
  runpy.run_module(sys.argv[0], run_name="__main__")
else:
  exec(sys.argv[3])
"""


def _run_hiding(hidden: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, "-c", HIDE, hidden, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _requirement_pins() -> list[str]:
  lines = (REPO / "requirements.txt").read_text().splitlines()
  return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_pyproject_declares_the_pins_of_requirements_txt_and_installs_only_the_library():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert project["project"]["dependencies"] == _requirement_pins()
  assert all("==" in pin for pin in _requirement_pins())
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["tsallis_jax*"]


def test_launch_help_works_without_jax():
  out = _run_hiding("jax,jaxlib", "-m", "launch.tpu", "--help")
  assert out.returncode == 0, out.stderr
  assert "usage: python -m launch.tpu" in out.stdout
  check = _run_hiding("jax,jaxlib", "-c", "import launch.tpu, sys; assert 'jax' not in sys.modules; import jax")
  assert "No module named 'jax'" in check.stderr  # the hiding works, and launch.tpu imported no JAX


def test_no_pytorch_advisory_from_transformers_on_our_imports():
  plain = _run_hiding("torch", "-c", "import transformers")
  assert plain.returncode == 0 and "PyTorch was not found" in plain.stderr  # the advisory exists without torch
  ours = _run_hiding("torch", "-c", "import tsallis_jax\nfrom tsallis_jax.data import synthetic\n"
                     "import logging, transformers\nassert len(synthetic.make_tokenizer()) > 0\n"
                     "logging.getLogger('transformers').warning('other messages still pass')")
  assert ours.returncode == 0, ours.stderr
  assert "PyTorch was not found" not in ours.stderr and "other messages still pass" in ours.stderr


def _import_graph(*, top_level_only: bool) -> dict[str, set[str]]:
  """module -> the tsallis_jax modules it imports (read with `ast`, nothing imported); function-level imports too
  unless `top_level_only`."""
  import ast
  root = REPO / "tsallis_jax"
  names = {}
  for path in root.rglob("*.py"):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in names.items():
    tree = ast.parse(path.read_text())
    deps = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsallis_jax"):
        deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module for a in node.names}
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("tsallis_jax")}
    graph[name] = deps - {name}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a list of nodes, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycles_and_the_model_never_imports_the_trainer():
  """Modules import each other without a cycle, subpackages too (counting imports inside functions), and the
  layers point one way: `tsallis_jax.model` (building a model included) knows nothing of `tsallis_jax.train`."""
  assert _cycle(_import_graph(top_level_only=True)) is None
  packages: dict[str, set[str]] = {}
  for module, deps in _import_graph(top_level_only=False).items():
    if module.count(".") >= 1:  # the root package's own __init__ re-exports from every layer
      pkg = ".".join(module.split(".")[:2])
      packages.setdefault(pkg, set()).update(".".join(d.split(".")[:2]) for d in deps)
  packages = {k: v - {k, "tsallis_jax"} for k, v in packages.items()}
  assert _cycle(packages) is None, _cycle(packages)
  assert "tsallis_jax.train" not in packages["tsallis_jax.model"]
  assert not packages["tsallis_jax.data"] - {"tsallis_jax.errors"}
