"""torch.fx symbolic tracing of fused models.

torchvision's create_feature_extractor (and other torch.fx.symbolic_trace
tools) trace a fused ResNet as they trace torchvision's: conv1 ... layer4,
avgpool, fc keep their module paths, so `{"layer1": ..., "layer4": ...}`
return nodes work unchanged. Each fused block is one opaque call in the
graph that runs the real fused forward whenever the traced module runs, so a
feature extractor keeps the fused blocks. The stem is traced as its eager
modules (conv1 -> bn1 -> relu -> maxpool, torchvision's node names): a root
module cannot be an argument of a graph node.

Why opaque: a fused forward picks its path from the input's device, dtype,
grad mode and hooks, Python control flow a symbolic trace cannot follow.
The call is a torch.fx.wrap'ed function taking the module itself (recorded
as a get_attr of its qualified name) and the input.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from .. import _compat


def symbolic_tracing() -> bool:
    """True inside torch.fx.symbolic_trace (not torch.compile / export, which
    set the same flag but trace our custom ops instead)."""
    if torch.compiler.is_compiling():  # first: dynamo then never reads the thread-local flag
        return False
    return _compat.fx_symbolic_tracing()


def fused_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block's forward, without the tracing check: one graph node per block."""
    return block._forward_untraced(x)


torch.fx.wrap("fused_block")
