"""recurrent_lens: mechanistic interpretability for recurrent language models with matrix states.

Every per-token write ``W_t`` and state ``S_t`` of Gated DeltaNet (Qwen3.5), Mamba-2, RWKV-7, DeltaNet
and GLA is a named TransformerLens hook point (``blocks.{l}.mixer.hook_write`` / ``hook_state``), and
sparse autoencoders shaped for those matrices attach to them as ordinary modules.
"""

from recurrent_lens.config import ModelConfig
from recurrent_lens.models import delta_net, gated_deltanet, gla, mamba2, rwkv7  # noqa: F401  (registers them)
from recurrent_lens.models.base import HookedRecurrentModel
from recurrent_lens.models.cache import RecurrentCache
from recurrent_lens.models.registry import Architecture, register_architecture
from recurrent_lens.pretrained import list_pretrained
from recurrent_lens.sae import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE

__all__ = [
    "HookedRecurrentModel", "ModelConfig", "RecurrentCache", "Architecture", "register_architecture",
    "WriteSAE", "FlatSAE", "MatrixSAE", "BilinearSAE", "list_pretrained",
]
__version__ = "0.1.0"
