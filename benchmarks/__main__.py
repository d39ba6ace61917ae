"""``python -m benchmarks``: parity and speed of fused_optim against torch.optim.

Without CUDA the Triton kernels run on CPU through Triton's interpreter, so the interpreter must be
switched on before fused_optim is imported; the timings are then not performance figures.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from .report import main  # after the interpreter switch

sys.exit(main())
