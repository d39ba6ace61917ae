"""Training with 8-bit states: the fused AdamW with ``state_dtype=torch.int8`` / ``torch.float8_e4m3fn``
ends within 1% of torch.optim.AdamW's loss with fp32 states, on the regression task of
``benchmarks/quantized_training.py`` (gradients spanning three or five decades inside every block
of 256 elements), seed 0. The benchmark runs more seeds, bf16 states and torchao's 8-bit and fp8
AdamW side by side (README, "8-bit states")."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quantized_training import LR, TASKS, Task, fused


@pytest.mark.parametrize(
    "task, state_dtype, stochastic",
    [
        ("3 decades", torch.int8, False),
        ("3 decades", torch.float8_e4m3fn, False),
        ("5 decades", torch.int8, False),
        # fp8 (3 mantissa bits) rounded to the nearest code lags the slowly growing second moment
        # over five decades (-0.8 to -1.9% over the benchmark's seeds); unbiased rounding does not
        ("5 decades", torch.float8_e4m3fn, True),
    ],
    ids=["3 decades-int8", "3 decades-fp8", "5 decades-int8", "5 decades-fp8 stochastic rounding"],
)
def test_8bit_states_train_within_1pct_of_fp32_states(task, state_dtype, stochastic):
    task = Task(0, TASKS[task])
    ref, _, _ = task.train(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.01))
    loss, model, opt = task.train(fused(state_dtype, stochastic))
    assert opt.state[model[0].weight]["exp_avg_sq_codes"].dtype == state_dtype  # the 8-bit states were in use
    start = task.train(lambda ps: torch.optim.SGD(ps, lr=0.0))[0]
    assert ref < 0.5 * start, (ref, start)  # the task was learned
    assert abs(loss / ref - 1) <= 0.01, f"8-bit final loss {loss:.5f} vs fp32 {ref:.5f}: {100 * (loss / ref - 1):+.2f}%"
