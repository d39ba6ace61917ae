"""``python -m benchmarks``: see ``benchmarks/README.md``.

Without CUDA the Triton kernels run on CPU through Triton's interpreter, which must be switched on
before fused_optim is imported.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from .runner import main  # after the interpreter switch

sys.exit(main())
