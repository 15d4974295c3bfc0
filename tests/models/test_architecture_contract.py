"""What every architecture file relies on: typed options, the registry, the forward context and the
generic hooks of a registry entry; and what the architecture files must not do (import each other)."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from recurrent_lens import Architecture, HookedRecurrentModel, ModelConfig, register_architecture
from recurrent_lens.models import fla_format, gla, rwkv7
from recurrent_lens.models.components import GatedRMSNorm, make_mlp
from recurrent_lens.models.mixer import ForwardContext
from recurrent_lens.models.options import ArchOptions
from recurrent_lens.models.registry import architectures, get_architecture
from recurrent_lens.models.scan import RecurrenceInputs

MODELS = Path(__file__).resolve().parents[2] / "recurrent_lens" / "models"
BUILTINS = ("gated_deltanet", "delta_net", "gla", "mamba2", "rwkv7")
SIZES = dict(d_model=64, n_layers=1, d_vocab=10, n_heads=4, d_k=16, d_v=16)


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


def test_fla_mixer_weight_maps_fused_qkv_rows_renames_and_kept_prefixes():
    cfg = ModelConfig(architecture="gla", **SIZES, options={"num_kv_heads": 2})
    qd, kd, vd = 4 * 16, 2 * 16, 2 * 16
    target = gla.map_fla_weight("model.layers.0.attn.v_proj.weight", cfg)
    assert (target.name, target.rows) == ("blocks.0.mixer.in_proj_qkv.weight", slice(qd + kd, qd + kd + vd))
    assert gla.map_fla_weight("model.layers.0.attn.gk_proj.1.bias", cfg).name == "blocks.0.mixer.gk_proj.1.bias"
    assert gla.map_fla_weight("model.layers.0.attn.g_norm.weight", cfg).name == "blocks.0.mixer.norm.weight"
    assert gla.map_fla_weight("model.layers.0.attn.unknown.weight", cfg) is None
    assert gla.map_fla_weight("model.layers.0.mlp_norm.weight", cfg).name == "blocks.0.ln2.weight"
    assert fla_format.fla_mixer_key("model.layers.12.mlp.gate_proj.weight") is None


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("arch", BUILTINS)
def test_unknown_option_names_the_architecture_the_key_and_the_valid_keys(arch):
    valid = sorted(f.name for f in dataclasses.fields(get_architecture(arch).options))
    with pytest.raises(ValueError) as err:
        ModelConfig(architecture=arch, **SIZES, options={"use_gat": False})
    assert str(err.value) == f"options: architecture {arch!r} has no option 'use_gat'; valid options: {valid}"


@pytest.mark.parametrize("arch, key, value, expected", [
    ("gated_deltanet", "use_gate", "false", "True or False"),
    ("gated_deltanet", "gate_act", "swish", "'silu' or 'sigmoid'"),
    ("delta_net", "use_beta", 1, "True or False"),
    ("gla", "num_kv_heads", 2.0, "an int or None"),
    ("gla", "clamp_min", "low", "a number or None"),
    ("mamba2", "time_step_limit", (0.1,), "a list or tuple of 2 (a number, a number)"),
    ("rwkv7", "decay_low_rank_dim", True, "an int or None"),
])
def test_option_of_the_wrong_type_is_refused(arch, key, value, expected):
    with pytest.raises(ValueError, match=r"^options\['" + key + r"'\] of architecture '" + arch + "': expected "
                       + expected.replace("(", r"\(").replace(")", r"\)") + ", got"):
        ModelConfig(architecture=arch, **SIZES, options={key: value})


def test_options_stay_the_given_dict_and_parse_into_the_dataclass():
    options = {"time_step_limit": [0, 2], "gated_norm_eps": 1}
    cfg = ModelConfig(architecture="mamba2", **SIZES, options=options)
    assert cfg.options is options and ModelConfig.from_dict(cfg.to_dict()) == cfg
    parsed = get_architecture("mamba2").options.from_config(cfg)
    assert parsed.time_step_limit == (0.0, 2.0) and parsed.gated_norm_eps == 1.0 and parsed.d_inner is None
    assert type(parsed.gated_norm_eps) is float


def test_options_that_do_not_fit_the_config_are_refused_when_it_is_built():
    with pytest.raises(ValueError, match=r"options\['num_kv_heads'\]: must divide n_heads = 4, got 3"):
        ModelConfig(architecture="gla", **SIZES, options={"num_kv_heads": 3})
    with pytest.raises(ValueError, match=r"options\['d_inner'\]: expected >= n_heads·d_v = 64, got 32"):
        ModelConfig(architecture="mamba2", **SIZES, options={"d_inner": 32})
    with pytest.raises(ValueError, match=r"options\['time_step_limit'\]: expected \(low, high\) with low <= high"):
        ModelConfig(architecture="mamba2", **SIZES, options={"time_step_limit": (1, 0)})


def test_unregistered_architecture_and_an_architecture_without_options():
    with pytest.raises(ValueError, match="architecture: unknown name 'no_such_arch'"):
        ModelConfig(architecture="no_such_arch", **SIZES)
    register_architecture(Architecture("test_no_options", get_architecture("gla").mixer), overwrite=True)
    with pytest.raises(ValueError, match="architecture 'test_no_options' has no option 'num_kv_heads'; valid options: "
                                         r"\[\]"):
        ModelConfig(architecture="test_no_options", **SIZES, options={"num_kv_heads": 2})
    assert ModelConfig(architecture="test_no_options", **SIZES).options == {}


def test_option_literals_match_what_the_code_implements():
    hint = typing.get_type_hints(gla.GLAOptions)["feature_map"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(gla._FEATURE_MAPS)


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


# ----------------------------------------------------------------------------------- registry hooks
class _Doubling(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x, cache=None):
        return 2 * x * self.scale


def test_an_architecture_declares_its_own_mlp_and_embedding_norm():
    register_architecture(Architecture("test_own_parts", get_architecture("gla").mixer, mlp=_Doubling,
                                       embed_norm=lambda cfg: nn.Identity()), overwrite=True)
    cfg = ModelConfig(architecture="test_own_parts", **SIZES, d_mlp=8, mlp="relu2")
    model = HookedRecurrentModel.from_config(cfg, seed=0)
    assert isinstance(model.blocks[0].mlp, _Doubling) and isinstance(model.ln_embed, nn.Identity)
    with pytest.raises(ValueError, match="mlp: architecture 'gla' builds only 'swiglu' MLPs, got 'relu2'"):
        make_mlp(ModelConfig(architecture="gla", **SIZES, d_mlp=8, mlp="relu2"))


# ----------------------------------------------------------------------------------- small pieces
def test_gated_rms_norm_is_norm_then_gate():
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm = GatedRMSNorm(8, 1e-6, act="silu")
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * torch.nn.functional.silu(g)
    torch.testing.assert_close(norm(x, g), expected)
    with pytest.raises(TypeError):
        GatedRMSNorm(8, 1e-6, norm_before_gate=False)


def test_chunks_cut_the_position_axis():
    x = RecurrenceInputs(q=torch.randn(2, 6, 3, 4), k=torch.randn(2, 6, 3, 4), v=torch.randn(2, 6, 3, 5),
                         beta=torch.rand(2, 6, 3))
    chunks = x.chunks(3)
    assert chunks.v.shape == (2, 2, 3, 3, 5) and chunks.beta.shape == (2, 2, 3, 3)
    assert torch.equal(chunks.v[1, 1, 2, 0], x.v[1, 3, 2]) and torch.equal(chunks.beta[0, 1, :, 2], x.beta[0, 5])


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


def test_every_option_has_a_default():
    for arch in BUILTINS:
        options = get_architecture(arch).options
        assert issubclass(options, ArchOptions) and options.parse(arch, {}) == options()
        for f in dataclasses.fields(options):
            assert f.default is not dataclasses.MISSING, (arch, f.name)
    cfg = ModelConfig(architecture="rwkv7", **SIZES, options={"a_low_rank_dim": 8})
    assert rwkv7.RWKV7Options.from_config(cfg).low_rank_dims(cfg) == {**rwkv7.default_low_rank_dims(64, 16),
                                                                       "a_low_rank_dim": 8}
