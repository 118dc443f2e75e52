"""The cudnn backend: whole conv + BN + add + ReLU graphs through the cuDNN
frontend's runtime fusion (csrc/cudnn, built when the frontend's headers are
found), and the cuda backend's BatchNorm kernels around them.

  graphs.py   the graph ops (conv_bias_act, conv_genstats, dgrad/wgrad), their
              fake kernels and autograd, the graph cache and its fallbacks
  units.py    the units built from them
"""
