"""kernels._common.finish_sums: the column sum that finishes the kernels' fp32 partial sums (layer-norm weight and bias
gradients, GELU bias gradient, attention qkv-bias gradient), under the interpreter here, natively on a GPU."""
import pytest
import torch

import kernels._common as common
from kernels._common import colsum_config, finish_sums
from tests.conftest import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (7, 3, 40), (70, 2, 33), (300, 17), (5, 3, 4, 16), (600, 40)])
def test_finish_sums_equal_a_float64_sum(shape, dtype):
    """Rows not a multiple of the row block, columns not of the column block, parts of 2-4 dims (600 rows: the
    512-row step, one whole and one partial): the sum over the
    first dim in fp32, rounded once (bf16: to nearest even, within half an ulp of the fp64 sum plus fp32 rounding)."""
    g = torch.Generator().manual_seed(sum(shape))
    part = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])).to(DEVICE)
    out = finish_sums(part, dtype)
    ref = part.double().sum(0)
    assert out.shape == part.shape[1:] and out.dtype == dtype and out.device == part.device
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * part.abs().sum(0).max().item())
    else:  # the fp32 sum rounded once: within one bf16 step of the fp64 sum's rounding (fp32 orders may differ)
        torch.testing.assert_close(out.double(), ref.float().to(dtype).double(), rtol=2**-8, atol=0)


def test_finish_sums_round_to_nearest_even():
    """One row, so the sum is the value: the bf16 result is torch's round-to-nearest-even cast, bit for bit
    (truncation, the interpreter's own fp32 -> bf16 cast, would differ on about half of these values)."""
    g = torch.Generator().manual_seed(0)
    part = torch.randn(1, 3, 500, generator=g).to(DEVICE)
    assert torch.equal(finish_sums(part, torch.bfloat16), part[0].to(torch.bfloat16))


def test_finish_sums_take_a_strided_part():
    """A part whose rows are strided (a column slice) is summed right, not read as if contiguous."""
    part = torch.randn(9, 12).to(DEVICE)[:, 2:7]
    torch.testing.assert_close(finish_sums(part, torch.float32), part.sum(0), rtol=1e-6, atol=1e-6)


def test_finish_sums_torch_path(monkeypatch):
    """FINISH = "torch" keeps torch's sum and cast; an empty part too."""
    monkeypatch.setattr(common, "FINISH", "torch")
    part = torch.randn(4, 6).to(DEVICE)
    assert torch.equal(finish_sums(part, torch.bfloat16), part.sum(0).to(torch.bfloat16))
    monkeypatch.setattr(common, "FINISH", "triton")
    assert finish_sums(torch.empty(0, 6).to(DEVICE), torch.float32).eq(0).all()


def test_colsum_config_gives_every_sm_a_program():
    for cols in (64, 768, 2048, 3072, 4096, 15360):
        cfg = colsum_config(cols, 132)
        assert cfg["BLOCK_R"] * cfg["BLOCK_C"] == 4096
        assert cfg["BLOCK_C"] == 16 or -(-cols // cfg["BLOCK_C"]) >= 132
    assert colsum_config(15360, 132)["BLOCK_C"] == 64 and colsum_config(3072, 132)["BLOCK_C"] == 16


def test_colsum_config_steps_512_rows_through_long_narrow_parts():
    """16-column blocks over LONG_ROWS rows or more take 512 rows a step; fewer rows, or wider blocks, 4,096 values."""
    assert colsum_config(2304, 132, 1024) == {"BLOCK_R": 512, "BLOCK_C": 16, "num_warps": 4}
    assert colsum_config(2304, 132, common.LONG_ROWS - 1)["BLOCK_R"] == 256
    assert colsum_config(3072, 132, 22)["BLOCK_R"] == 256
    assert colsum_config(15360, 132, 1024)["BLOCK_R"] == 64
