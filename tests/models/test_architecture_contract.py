"""What the architecture files must do and must not do: every built-in one registered and none importing
another, RWKV-7's typed forward context shared by its layers, facts stated in the code instead of citations of
files outside the repository, and lazy imports only of optional dependencies."""

import ast
from pathlib import Path

import pytest
import torch
from tests.support.helpers import BUILTINS, SIZES

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models import rwkv7
from recurrent_lens.models.mixer import ForwardContext
from recurrent_lens.models.registry import architectures

MODELS = Path(__file__).resolve().parents[2] / "recurrent_lens" / "models"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


# ---------------------------------------------------------------------------------------------- registry
def test_builtins_are_registered_and_no_architecture_file_imports_another():
    assert set(BUILTINS) <= set(architectures())
    arch_modules = {f"recurrent_lens.models.{name}" for name in BUILTINS}
    for name in BUILTINS:
        imported = _imported_modules(MODELS / f"{name}.py")
        assert not imported & (arch_modules - {f"recurrent_lens.models.{name}"}), name
    # the registry is a leaf the architectures import: it imports none of them
    assert not _imported_modules(MODELS / "registry.py") & arch_modules


# ------------------------------------------------------------------------------------- forward context
def test_rwkv7_layers_share_one_typed_context_and_refuse_a_plain_one():
    model = HookedRecurrentModel.from_config(ModelConfig(architecture="rwkv7", **{**SIZES, "n_layers": 2},
                                                         mlp="relu2", norm="layer", d_mlp=32), seed=0).eval()
    seen = []
    mixer = model.blocks[1].mixer
    mixer.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    tokens = torch.tensor([[1, 2, 3]])
    model(tokens)
    (ctx,) = seen
    assert isinstance(ctx, rwkv7.RWKV7Context) and ctx.tokens is tokens
    assert torch.equal(ctx.positions, torch.arange(3)) and ctx.v_first.shape == (1, 3, 4, 16)
    x = torch.zeros(1, 3, 64)
    with pytest.raises(TypeError, match="ctx: RWKV7Mixer needs a RWKV7Context, got ForwardContext"):
        mixer(x, None, ForwardContext())
    with pytest.raises(ValueError, match=r"ctx: expected fields of RWKV7Context \['capture', 'harvest', 'positions', "
                                         r"'tokens', 'v_first'\], got \['v_frist'\]"):
        mixer(x, None, {"v_frist": ctx.v_first})
    torch.testing.assert_close(mixer(x, None, {"v_first": torch.zeros(1, 3, 4, 16)}),
                               mixer(x, None, rwkv7.RWKV7Context(v_first=torch.zeros(1, 3, 4, 16))))


def test_rwkv7_bonus_uses_the_hooked_inputs():
    model = HookedRecurrentModel.from_config(ModelConfig(architecture="rwkv7", **SIZES, mlp="relu2", norm="layer",
                                                         d_mlp=32), seed=0).eval()
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.r_k.normal_()
    tokens = torch.tensor([[1, 2, 3, 4]])
    names = [f"blocks.0.mixer.hook_{n}" for n in ("q", "k", "v", "bonus")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    q, k, v, bonus = (cache[n] for n in names)
    torch.testing.assert_close(bonus, (q * k * mixer.r_k).sum(-1, keepdim=True) * v)
    assert bonus.abs().max() > 0

    def double(x, hook):
        return 2 * x

    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_v", double)]):
        _, edited = model.run_with_cache(tokens, names_filter="blocks.0.mixer.hook_bonus")
    torch.testing.assert_close(edited["blocks.0.mixer.hook_bonus"], 2 * bonus)


# ------------------------------------------------------------------------------------- package rules
def test_models_state_facts_instead_of_citing_files_outside_the_repository():
    for path in [*MODELS.glob("*.py"), MODELS.parent / "config.py"]:
        text = path.read_text()
        assert "DESIGN.md" not in text and "ARCHITECTURES.md" not in text, path.name


def test_lazy_imports_in_models_are_of_an_optional_dependency():
    """Imports inside functions are allowed only where a module-level import would import an optional
    dependency (fla); import cycles are refused outright by ``tests/test_import_graph.py``."""
    allowed = {("kernels.py", "fla.ops.gated_delta_rule"), ("kernels.py", "fla.ops.gla"),
               ("kernels.py", "fla.ops.simple_gla")}
    for path in [*MODELS.glob("*.py"), MODELS.parent / "config.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        module = inner.module if isinstance(inner, ast.ImportFrom) else inner.names[0].name
                        assert (path.name, module) in allowed, f"{path.name}: {node.name} imports {module}"
