"""The residual block and the unembedding that :class:`~recurrent_lens.HookedRecurrentModel` stacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from recurrent_lens.config import ModelConfig
from recurrent_lens.models.attention import Attention
from recurrent_lens.models.cache import LayerCache
from recurrent_lens.models.components import make_mlp, make_norm
from recurrent_lens.models.mixer import ForwardContext, fire
from recurrent_lens.models.registry import get_architecture


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(ln1 x)``, then ``+ mlp(ln2 x)`` when the block has an MLP.

    Hook points, in execution order::

        hook_resid_pre   [batch, pos, d_model]
        hook_mixer_out   [batch, pos, d_model]
        hook_resid_mid   [batch, pos, d_model]
        hook_mlp_out     [batch, pos, d_model]   (blocks with an MLP)
        hook_resid_post  [batch, pos, d_model]

    The mixer is ``blocks.{l}.mixer`` (a MatrixMixer) in recurrent layers and ``blocks.{l}.attn`` in the
    softmax-attention layers of hybrids.
    """

    hook_out_is_single_residual_stream = True
    """``hook_resid_post`` is the one ``[batch, pos, d_model]`` stream the next block (or ``ln_final``) reads;
    TransformerLens' logit lens checks every block for this flag."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.is_attention = cfg.layer_types[layer] == "attention"
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = make_norm(cfg)
        if self.is_attention:
            self.attn = Attention(cfg, layer)
        else:
            self.mixer = get_architecture(cfg.architecture).mixer(cfg, layer)
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.mlp = make_mlp(cfg)
        if self.mlp is not None:
            self.ln2 = make_norm(cfg)
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor, cache: LayerCache | None = None, ctx: ForwardContext | None = None) -> Tensor:
        x = fire(self.hook_resid_pre, x)
        mixer = self.attn if self.is_attention else self.mixer
        x = fire(self.hook_resid_mid, x + fire(self.hook_mixer_out, mixer(self.ln1(x), cache, ctx)).to(x.dtype))
        if self.mlp is not None:
            x = x + fire(self.hook_mlp_out, self.mlp(self.ln2(x), cache)).to(x.dtype)
        return fire(self.hook_resid_post, x)


class Unembed(nn.Module):
    """The untied unembedding: ``weight`` ``[d_vocab, d_model]``; called on ``[batch, pos, d_model]`` it gives
    fp32 logits ``[batch, pos, d_vocab]`` as the model's forward does."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.d_model**-0.5)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return F.linear(x.to(self.weight.dtype), self.weight).float()


class TiedUnembed(Unembed):
    """The unembedding of a tied model: ``weight`` is the embedding matrix, and the module holds no parameter
    of its own (so the state dict has no ``unembed.weight``). It exists so that ``model.unembed`` is a module
    in every model, as TransformerLens' tools expect."""

    def __init__(self, embed: nn.Embedding) -> None:
        nn.Module.__init__(self)
        # a plain attribute, not a submodule: the embedding is registered (and saved) once, as ``embed``
        self.__dict__["_embed"] = embed

    @property
    def weight(self) -> Tensor:
        return self._embed.weight

