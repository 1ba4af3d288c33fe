"""The bf16 screen for greedy ids (model/argmax.py) against the plain fp32 head's argmax."""

import pytest
import torch

from thoughtpatch.model.argmax import U, ArgmaxScreen, slack


def plain(w: torch.Tensor, h: torch.Tensor, ids: int) -> torch.Tensor:
    return torch.nn.functional.linear(h, w[:ids]).argmax(-1)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_screen_is_the_fp32_argmax(scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 96, generator=g) * 0.05
    h = torch.randn(64, 96, generator=g) * scale
    h[3, 7] = 400.0  # an outlier dimension, as trained hidden states have
    for ids in (3000, 2999):  # every id, or all but the last (CODI never emits <eot>)
        screen = ArgmaxScreen(w, ids)
        assert torch.equal(screen(h), plain(w, h, ids))


def test_near_ties_and_exact_ties():
    """Ids bf16 cannot tell apart are decided in fp32; an exact tie goes to the lowest id."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2000, 64, generator=g) * 0.05
    h = torch.randn(8, 64, generator=g)
    win = plain(w, h, 2000)
    for r in range(4):  # a row just above the winner, by far less than bf16 resolves
        step = h[r] / h[r].norm() ** 2 * 1e-4
        w[1000 + r] = w[win[r]] + step
    w[5], w[6] = w[win[5]], w[win[5]]  # two exact copies of row 5's winner below it
    w[1500] = w[win[6]]  # a copy of row 6's winner above it (the winner keeps its lower id unless it is above 1500)
    want = plain(w, h, 2000)
    assert torch.equal(want[:4], torch.arange(1000, 1004)) and int(want[5]) == 5
    assert torch.equal(ArgmaxScreen(w, 2000)(h), want)


def test_wide_rows_and_plain_rows():
    """Rows whose candidates overflow the top k are screened over the whole vocabulary, rows with
    too many candidates or non-finite values take the plain head: the same ids either way."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(500, 32, generator=g) * 0.05
    w[100:140] = w[7]  # 41 identical rows: every row's top k is all candidates when one of them wins
    h = torch.randn(16, 32, generator=g)
    h[0] = w[7] * 50
    h[1, 3], h[2, 5] = float("nan"), float("inf")
    for k, wide in ((4, 1024), (4, 2), (16, 1024)):
        screen = ArgmaxScreen(w, 500, k=k, max_wide=wide)
        assert torch.equal(screen(h), plain(w, h, 500)), (k, wide)


def check_worst_case_rounding() -> None:
    """Every product rounded the same way: the bf16 logit of this process's kernel must stay
    within E + u'|a| of the fp32 logit (what the screen assumes), and the case must be a hard
    one (near the bound, not far inside)."""
    n = 2048
    h = torch.full((4, n), 1 + 0.49 * 2.0**-7)  # each rounds down to 1 in bf16, by almost u
    h[1] *= -1
    h[2, : n // 2] = 3.0  # exact in bf16
    h[3] = torch.linspace(0.5, 2.0, n) * (1 + 0.49 * 2.0**-7)
    w = torch.stack([h[0], -h[0], torch.ones(n), h[3]])
    a = (h.to(torch.bfloat16) @ w.to(torch.bfloat16).T).float()
    fp32 = h @ w.T
    e = slack(n) * w.norm(dim=-1).max() * h.norm(dim=-1)[:, None]
    u = U / (1 - U)
    gap = (a - fp32).abs()
    assert (gap <= e + u * a.abs()).all()
    assert gap.max() >= 0.5 * slack(n) * n


def test_the_kernel_keeps_within_the_bound():
    """The worst case for the bound, on the kernel the suite uses (tests/conftest.py pins oneDNN
    to AVX-512 bf16 for the golden tests) and, in a fresh process without that pin, on the one
    the engine uses outside the tests (AMX where the CPU has it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    check_worst_case_rounding()
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    code = "from tests.model.test_argmax import check_worst_case_rounding as c; c()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_first_argmax_is_torch_argmax():
    """The read-out's argmax (the index half of `max`) keeps argmax's rules: the first of tied
    maxima, a NaN wins, and slices of the vocabulary work as whole rows do."""
    from thoughtpatch.model.runtime import first_argmax

    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5003, generator=g)
    x[:8, [10, 700, 4999]] = 9.0  # ties, the first one must win
    x[8:16, [5002, 3]] = 9.0  # a tie with the last column: the slice below drops it
    x[20, 1234] = float("nan")
    x[21, [0, 5002]] = float("inf")
    for t in (x, x[:, :5002], x[:, :4000]):
        assert torch.equal(first_argmax(t), t.argmax(-1))
    assert first_argmax(x)[:8].tolist() == [10] * 8 and first_argmax(x[:, :5002])[8:16].tolist() == [3] * 8
