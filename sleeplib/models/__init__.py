"""Sleep-staging models, one per file, and a name -> class registry.

All models follow the braindecode-style contract of ``CONTRIBUTING.md``:
``Model(n_outputs=5, n_chans=1, sfreq=100., n_times=3000, ...)``; epoch models map
``(B, C, T)`` (or ``(B, T)``) to logits ``(B, n_outputs)`` and to features with
``return_feats=True``; sequence models map ``(B, L, C, T)`` to ``(B, L, n_outputs)``.
"""

from __future__ import annotations

from torch import nn

from .attnsleep import AttnSleep
from .attnsleep_conformer import AttnSleepConformer
from .attnsleep_msmp import AttnSleepMSMP
from .deepsleepnet import DeepFeatureNet, DeepSleepNet
from .sleepeegnet import SleepEEGNet

__all__ = [
    "MODELS",
    "SEQUENCE_MODELS",
    "NOT_VMAPPABLE",
    "build_model",
    "AttnSleep",
    "AttnSleepConformer",
    "AttnSleepMSMP",
    "DeepFeatureNet",
    "DeepSleepNet",
    "SleepEEGNet",
]

MODELS: dict[str, type[nn.Module]] = {
    "attnsleep": AttnSleep,
    "attnsleep_conformer": AttnSleepConformer,
    "attnsleep_msmp": AttnSleepMSMP,
    "deepfeaturenet": DeepFeatureNet,
    "deepsleepnet": DeepSleepNet,
    "sleepeegnet": SleepEEGNet,
}
"""Registry of model classes by lower-case name."""

SEQUENCE_MODELS = frozenset({"deepsleepnet", "sleepeegnet"})
"""Models taking ``(B, L, C, T)``. ``DeepSleepNet.forward(x, state=None)`` returns
``(logits, new_state)``; ``SleepEEGNet.forward(x, targets=None, teacher_forcing=True)`` returns
logits. All others are epoch models ``forward(x, return_feats=False)``."""

# Models that cannot be trained several folds at once under torch.func.vmap: AttnSleepMSMP picks
# its FFT periods per batch (data-dependent shapes) and runs a GRU, which vmap does not support.
NOT_VMAPPABLE = frozenset({"attnsleep_msmp"}) | SEQUENCE_MODELS


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model.

    Parameters
    ----------
    name : str
        Key of :data:`MODELS` (case-insensitive), e.g. ``"attnsleep"``.
    **kwargs
        Passed to the model's constructor (``n_outputs``, ``n_chans``, ``sfreq``, ``n_times`` and
        model hyper-parameters).

    Returns
    -------
    torch.nn.Module
        The new model (in training mode, freshly initialised).
    """
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[key](**kwargs)
