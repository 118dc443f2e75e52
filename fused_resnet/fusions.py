"""Fusion switches, for ablations in performance research: which of the
optional fusions the fused paths use. FUSIONS (module-level dict, read on
every forward and backward), set_fusions() / get_fusions() (also
fused_resnet.set_fusions), and $FUSED_RESNET_FUSIONS, read at import, e.g.
FUSED_RESNET_FUSIONS="shortcut_gemm=0,prologue=1".

Its own module so that both the ops (whose backward reads prologue_dgrad)
and the block paths can read it.
"""

from __future__ import annotations

import os
import warnings

FUSIONS_ENV_VAR = "FUSED_RESNET_FUSIONS"
# name -> on by default. shortcut_gemm: the projection shortcut as a second
# GEMM in the last conv of a block (eval, triton backend).
# prologue: in training on the triton backend, each BN + ReLU inside a block
# applied in the next conv's prologue (off until a GPU run shows it faster:
# the prologue moves the A tile through registers).
# prologue_dgrad: with the prologue on, the backward of each prologue conv
# of stride 1 runs its data gradient with the prologue's ReLU + BN backward
# fused into the epilogue (launch.conv2d_dgrad_prologue): d(activation) is
# never written. A sub-switch of prologue, for ablating the two separately.
FUSION_DEFAULTS: dict[str, bool] = {"shortcut_gemm": True, "prologue": False, "prologue_dgrad": True}
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def _fusions_from_env(text: str | None) -> dict[str, bool]:
    """FUSION_DEFAULTS updated by "name=0|1,..." (also on/off, true/false);
    a malformed or unknown entry is warned about and ignored (importing never
    fails because of the environment)."""
    out = dict(FUSION_DEFAULTS)
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if name in out and value in _TRUE + _FALSE:
            out[name] = value in _TRUE
        else:
            warnings.warn(f"fused_resnet: ignoring {item!r} in ${FUSIONS_ENV_VAR}; expected name=0 or name=1 "
                          f"with name one of {', '.join(FUSION_DEFAULTS)}", RuntimeWarning, stacklevel=2)
    return out


# The switches the fused paths read on every forward. Change them with
# set_fusions() (or assign the dict's entries directly).
FUSIONS: dict[str, bool] = _fusions_from_env(os.environ.get(FUSIONS_ENV_VAR))


def set_fusions(**flags: bool) -> dict[str, bool]:
    """Turn individual fusions on or off for every model (for ablations);
    returns the previous settings, so `set_fusions(**old)` restores them.

        old = fused_resnet.set_fusions(shortcut_gemm=False)
        ...  # measure without the fused projection shortcut
        fused_resnet.set_fusions(**old)

    Fusions: shortcut_gemm (default on): in eval on the triton backend, a
    block's downsample (1x1 conv + BN) runs as a second GEMM inside its last
    conv's kernel. prologue (default off): in training on the triton
    backend, every BN + ReLU inside a block (not the last, which adds the
    shortcut) is applied by the next conv as it loads its input
    (ops.conv2d_prologue_bn_act), so that activation is never written, nor
    saved: the backward recomputes it. prologue_dgrad (default on, used
    only with prologue): a stride-1 prologue conv's backward computes its
    data gradient and the prologue's ReLU + BN backward in one Triton kernel
    (d(activation) is never written). A torch.compile'd model keeps the
    setting it was traced with.
    """
    for name, value in flags.items():
        if name not in FUSIONS:
            raise ValueError(f"set_fusions: unknown fusion {name!r}; known: {', '.join(FUSIONS)}")
        if not isinstance(value, bool):
            raise TypeError(f"set_fusions: `{name}` must be True or False, got {value!r}")
    old = dict(FUSIONS)
    FUSIONS.update(flags)
    return old


def get_fusions() -> dict[str, bool]:
    """The current fusion switches (a copy)."""
    return dict(FUSIONS)
