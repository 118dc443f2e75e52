"""The fused forward paths of the modules, split by concern. Each asks
fused_resnet.dispatch which unit a backend runs and never compares backend
names itself.

  units.py      conv -> BN [-> + residual] [-> ReLU], in eval and in training
  block.py      a residual block: its units, shortcut, block-level fusions
  ownership.py  when a ResNet's blocks may write over their own inputs
  stem.py       a ResNet's stem and its max pool
"""

from . import block, ownership, stem, units  # noqa: F401 - the paths the modules call
