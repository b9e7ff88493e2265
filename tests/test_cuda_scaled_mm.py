"""The strict CUDA stand-in for torch._scaled_mm (tests/cuda_scaled_mm.py).

Each "CPU accepts, CUDA rejects" case first asserts that the real CPU torch._scaled_mm takes the
call, so the case keeps meaning something if a later torch changes the CPU kernel.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tests.cuda_scaled_mm import (
    ARCH_MESSAGE,
    ARCHS,
    BANDS,
    CLAIMED,
    CUBLAS_NOT_SUPPORTED,
    E4M3,
    E5M2,
    LAYOUT_MESSAGE,
    NO_KERNEL_IMAGE,
    ROWWISE,
    TENSORWISE,
    CudaScaledMMError,
    CudaScaledMMValueError,
    ScaledMMContract,
    cublas_trans,
    patched_scaled_mm,
    strict_scaled_mm,
)

CPU_SCALED_MM = torch.ops.aten._scaled_mm  # the real kernel, whatever torch._scaled_mm is patched to


def ids(contracts):
    return [str(c) for c in contracts]


RUNNABLE = [c for c in CLAIMED if c.fp8_supported()]
NO_BUILD = [c for c in CLAIMED if not c.build_has_arch()]
ROWWISE_OK = [c for c in CLAIMED if c.rowwise_supported()]
ROWWISE_MISSING = [c for c in RUNNABLE if not c.rowwise_supported()]


# -- the verified table ----------------------------------------------------------------------

# (arch, band) -> (FP8 GEMM runs at all, row-wise form runs)
TABLE = {
    ("SM89", "2.4"): (True, False),
    ("SM89", "2.5-2.6"): (True, False),
    ("SM89", ">=2.7"): (True, True),
    ("SM90", "2.4"): (True, False),
    ("SM90", "2.5-2.6"): (True, True),
    ("SM90", ">=2.7"): (True, True),
    ("SM100", "2.4"): (False, False),
    ("SM100", "2.5-2.6"): (False, False),
    ("SM100", ">=2.7"): (True, False),
    ("SM120", "2.4"): (False, False),
    ("SM120", "2.5-2.6"): (False, False),
    ("SM120", ">=2.7"): (True, False),
}


def test_claimed_covers_every_arch_and_band():
    assert {(c.arch, c.torch_version) for c in CLAIMED} == {(a, v) for a in ARCHS.values() for v in BANDS.values()}
    assert {c.band for c in CLAIMED} == set(BANDS)


@pytest.mark.parametrize("arch,band", list(TABLE))
def test_contract_table(arch, band):
    contract = ScaledMMContract(ARCHS[arch], BANDS[band])
    assert (contract.fp8_supported(), contract.rowwise_supported()) == TABLE[arch, band]
    assert contract.returns_tuple == (band == "2.4")


@pytest.mark.parametrize(
    "arch,version,rowwise",
    [
        ((8, 9), (2, 6), False),
        ((8, 9), (2, 13), True),
        ((9, 0), (2, 13), True),
        ((10, 0), (2, 7), False),  # SM100 kernel merged around the 2.7 cut: strict
        ((10, 0), (2, 8), True),
        ((12, 0), (2, 8), False),
        ((12, 0), (2, 13), False),  # open cuBLAS/CUTLASS dispatch bugs: strict, never
        ((8, 6), (2, 13), False),  # no FP8 at all below CC 8.9
    ],
)
def test_rowwise_by_version(arch, version, rowwise):
    assert ScaledMMContract(arch, version).rowwise_supported() is rowwise


@pytest.mark.parametrize("version", [(2, 5), (2, 7), (2, 13)])
def test_no_rowwise_on_windows(version):
    assert not ScaledMMContract((9, 0), version, platform="windows").rowwise_supported()
    assert ScaledMMContract((9, 0), version, platform="windows").fp8_supported()


# -- operands --------------------------------------------------------------------------------


def operands(m=32, k=64, n=48, a_dtype=E4M3, b_dtype=E4M3, seed=0):
    """mat1 [M, K] row-major, mat2 [K, N] column-major (the transpose of a row-major weight)."""
    g = torch.Generator().manual_seed(seed)
    mat1 = (torch.randn(m, k, generator=g) * 4).to(a_dtype)
    mat2 = (torch.randn(n, k, generator=g) * 4).to(b_dtype).t()
    return mat1, mat2


def rowwise_scales(m=32, n=48):
    g = torch.Generator().manual_seed(1)
    return torch.rand(m, 1, generator=g) + 0.5, torch.rand(1, n, generator=g) + 0.5


def tensor_scales(shape=()):
    return torch.full(shape, 0.75), torch.full(shape, 1.25)


def call(**kw):
    """Keyword arguments every band's signature takes (2.4: keyword-only scales)."""
    return kw


# -- CPU accepts, CUDA rejects ---------------------------------------------------------------


@dataclass
class Case:
    name: str
    kwargs: Callable[[], dict]
    message: Callable[[ScaledMMContract], str]


def same(text):
    return lambda contract: text


def scale_dtype_message(contract):
    return "scale_a must be float scalar" if contract.band == "2.4" else "Both scale_a and scale_b must be float (fp32)"


def rowwise_message(text):
    """2.4 has no row-wise form: its scale check fires first."""
    return lambda contract: "scale_a must be float scalar" if contract.band == "2.4" else text


def _tw(m=32, k=64, n=48, a=E4M3, b=E4M3, out=torch.bfloat16, bias=None, scales=None):
    mat1, mat2 = operands(m, k, n, a, b)
    scale_a, scale_b = scales if scales is not None else tensor_scales()
    return call(input=mat1, mat2=mat2, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out)


def _rw(out=torch.bfloat16, b=E4M3, bias=None):
    mat1, mat2 = operands(b_dtype=b)
    scale_a, scale_b = rowwise_scales()
    return call(input=mat1, mat2=mat2, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out)


def _col_major_mat1():
    kw = _tw()
    kw["input"] = kw["input"].t().contiguous().t()
    return kw


def _row_major_mat2():
    kw = _tw()
    kw["mat2"] = kw["mat2"].contiguous()
    return kw


CPU_ACCEPTS_CUDA_REJECTS = [
    Case(
        "e5m2 x e5m2", lambda: _tw(a=E5M2, b=E5M2), same("Multiplication of two Float8_e5m2 matrices is not supported")
    ),
    Case(
        "fp32 output with a bias",
        lambda: _tw(out=torch.float32, bias=torch.randn(48).bfloat16()),
        same("Bias is not supported when out_dtype is set to Float32"),
    ),
    Case(
        "fp32 bias",
        lambda: _tw(bias=torch.randn(48)),
        same("Bias must be either Half or BFloat16, but got Float"),
    ),
    Case(
        "fp16 bias with bf16 output",
        lambda: _tw(bias=torch.randn(48).half()),
        same("Bias must be BFloat16 to compute BFloat16 output, but got Half"),
    ),
    Case(
        "bf16 bias with fp16 output",
        lambda: _tw(out=torch.float16, bias=torch.randn(48).bfloat16()),
        same("Bias must be Float16 to compute Half output, but got BFloat16"),
    ),
    Case(
        "K not a multiple of 16", lambda: _tw(k=40), same("Expected trailing dimension of mat1 to be divisible by 16")
    ),
    Case("N not a multiple of 16", lambda: _tw(n=40), same("mat2 shape (64x40")),
    Case("column-major mat1", _col_major_mat1, same(LAYOUT_MESSAGE)),
    Case("row-major mat2", _row_major_mat2, same(LAYOUT_MESSAGE)),
    Case(
        "float64 scales",
        lambda: _tw(scales=(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))),
        scale_dtype_message,
    ),
    Case(
        "bfloat16 scales",
        lambda: _tw(scales=(torch.tensor(0.5, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.bfloat16))),
        scale_dtype_message,
    ),
    Case("e5m2 output from e4m3 x e4m3", lambda: _tw(out=E5M2), same(CUBLAS_NOT_SUPPORTED)),
    Case("row-wise with fp32 output", lambda: _rw(out=torch.float32), rowwise_message("Only bf16 high")),
    Case("row-wise with fp16 output", lambda: _rw(out=torch.float16), rowwise_message("Only bf16 high")),
    Case(
        "row-wise with an e5m2 mat2",
        lambda: _rw(b=E5M2),
        lambda c: c.rowwise_unavailable_reason() or "Expected b.dtype() == at::kFloat8_e4m3fn to be true",
    ),
]


def expected_message(case: Case, contract: ScaledMMContract) -> str:
    return NO_KERNEL_IMAGE if not contract.build_has_arch() else case.message(contract)


@pytest.mark.parametrize("case", CPU_ACCEPTS_CUDA_REJECTS, ids=lambda c: c.name)
def test_cpu_accepts(case):
    CPU_SCALED_MM(**{("self" if k == "input" else k): v for k, v in case.kwargs().items()})


@pytest.mark.parametrize("contract", CLAIMED, ids=ids(CLAIMED))
@pytest.mark.parametrize("case", CPU_ACCEPTS_CUDA_REJECTS, ids=lambda c: c.name)
def test_cuda_rejects(case, contract):
    with pytest.raises(RuntimeError, match=re.escape(expected_message(case, contract))):
        strict_scaled_mm(contract)(**case.kwargs())


@pytest.mark.parametrize("contract", ROWWISE_MISSING, ids=ids(ROWWISE_MISSING))
def test_rowwise_rejected_where_missing(contract):
    """The engine's default (per-channel weight scales) on SM89 with torch < 2.7, SM100/120, 2.4."""
    kw = _rw(bias=torch.randn(48).bfloat16())
    CPU_SCALED_MM(**{("self" if k == "input" else k): v for k, v in kw.items()})
    with pytest.raises(RuntimeError, match=re.escape(contract.rowwise_unavailable_reason())):
        strict_scaled_mm(contract)(**kw)


def test_sm89_rowwise_before_2_7_is_the_issue_claim():
    with pytest.raises(RuntimeError, match=NO_KERNEL_IMAGE):
        strict_scaled_mm(ScaledMMContract((8, 9), (2, 5)))(**_rw())
    strict_scaled_mm(ScaledMMContract((8, 9), (2, 7)))(**_rw())


@pytest.mark.parametrize("contract", ROWWISE_OK, ids=ids(ROWWISE_OK))
def test_rowwise_layout_and_contiguity(contract):
    fake = strict_scaled_mm(contract)
    kw = _rw()
    kw["input"] = kw["input"].t().contiguous().t()  # column-major mat1
    with pytest.raises(RuntimeError, match=re.escape("Expected a.stride(1) == 1 to be true")):
        fake(**kw)
    kw = _rw()
    kw["mat2"] = kw["mat2"].contiguous()  # row-major mat2
    with pytest.raises(RuntimeError, match=re.escape("Expected b.stride(0) == 1 to be true")):
        fake(**kw)
    kw = _rw()
    kw["scale_b"] = torch.rand(1, 96)[:, ::2]  # (1, N) but not contiguous: the CPU refuses it too
    with pytest.raises(RuntimeError, match="contiguous"):
        fake(**kw)


def test_arch_below_8_9_rejects_everything():
    contract = ScaledMMContract((8, 6), (2, 7))
    with pytest.raises(RuntimeError, match=re.escape(ARCH_MESSAGE)):
        strict_scaled_mm(contract)(**_tw())


@pytest.mark.parametrize("contract", NO_BUILD, ids=ids(NO_BUILD))
def test_blackwell_before_2_7_rejects_everything(contract):
    with pytest.raises(RuntimeError, match=NO_KERNEL_IMAGE):
        strict_scaled_mm(contract)(**_tw())


def test_windows_rejects_rowwise():
    for version, message in (((2, 5), "Per-row scaling is not supported"), ((2, 9), "Rowwise scaling is not")):
        contract = ScaledMMContract((9, 0), version, platform="windows")
        with pytest.raises(RuntimeError, match=message):
            strict_scaled_mm(contract)(**_rw())
        strict_scaled_mm(contract)(**_tw())


# -- wrong scale shapes (the CPU refuses these as well) --------------------------------------

M, N = 32, 48
SCALE_SHAPES = [
    ("1-D row scales", lambda: (torch.rand(M), torch.rand(N)), "scale tensors must be 2-dimensional"),
    ("per-tensor a with per-channel b", lambda: (torch.tensor(1.0), torch.rand(1, N)), "must be 2-dimensional"),
    ("(1, 1) a with per-channel b", lambda: (torch.ones(1, 1), torch.rand(1, N)), "Invalid scaling configuration"),
    ("b scale shaped (N, 1)", lambda: (torch.rand(M, 1), torch.rand(N, 1)), "Invalid scaling configuration"),
    ("expanded (stride 0) a scale", lambda: (torch.ones(1, 1).expand(M, 1), torch.rand(1, N)), "contiguous"),
]


@pytest.mark.parametrize("name,scales,message", SCALE_SHAPES, ids=[s[0] for s in SCALE_SHAPES])
@pytest.mark.parametrize("contract", RUNNABLE, ids=ids(RUNNABLE))
def test_wrong_scale_shapes(name, scales, message, contract):
    scale_a, scale_b = scales()
    mat1, mat2 = operands()
    with pytest.raises((RuntimeError, ValueError)):
        CPU_SCALED_MM(mat1, mat2, scale_a, scale_b, out_dtype=torch.bfloat16)
    if contract.band == "2.4":
        message = "scale_a must be float scalar" if scale_a.numel() != 1 else "scale_b must be a float scalar"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        strict_scaled_mm(contract)(input=mat1, mat2=mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def test_scaling_message_from_2_9():
    scale_a, scale_b = torch.ones(1, 1), torch.rand(1, N)
    mat1, mat2 = operands()
    with pytest.raises(RuntimeError, match=re.escape("- For RowWise scaling, a and b should be float8")):
        strict_scaled_mm(ScaledMMContract((9, 0), (2, 9)))(mat1, mat2, scale_a, scale_b, out_dtype=torch.bfloat16)


def test_value_errors_from_2_10():
    """torch >= 2.10 raises some checks as ValueError (TORCH_CHECK_VALUE): the engine must catch both."""
    kw = _tw(a=E5M2, b=E5M2)
    with pytest.raises(CudaScaledMMValueError) as caught:
        strict_scaled_mm(ScaledMMContract((9, 0), (2, 10)))(**kw)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)
    with pytest.raises(CudaScaledMMError) as caught:
        strict_scaled_mm(ScaledMMContract((9, 0), (2, 7)))(**kw)
    assert not isinstance(caught.value, ValueError)


# -- the valid forms run, with the CPU kernel's exact result ---------------------------------

VALID_TENSORWISE = [
    ("scales []", lambda: _tw()),
    ("scales [1]", lambda: _tw(scales=tensor_scales((1,)))),
    ("scales [1, 1]", lambda: _tw(scales=tensor_scales((1, 1)))),
    ("bf16 out, bf16 bias", lambda: _tw(bias=torch.randn(48).bfloat16())),
    ("fp16 out, fp16 bias", lambda: _tw(out=torch.float16, bias=torch.randn(48).half())),
    ("fp32 out", lambda: _tw(out=torch.float32)),
    ("e4m3 x e5m2", lambda: _tw(b=E5M2)),
    ("e5m2 x e4m3", lambda: _tw(a=E5M2)),
    ("M not a multiple of 16", lambda: _tw(m=33)),
    ("e4m3 out", lambda: _tw(out=E4M3)),
]
VALID_ROWWISE = [
    ("bf16 out", lambda: _rw()),
    ("bf16 out, bf16 bias", lambda: _rw(bias=torch.randn(48).bfloat16())),
    ("e5m2 mat1", lambda: {**_rw(), "input": operands(a_dtype=E5M2)[0]}),
]


def cpu_result(kw, fast):
    args = {("self" if k == "input" else k): v for k, v in kw.items()}
    return CPU_SCALED_MM(**args, use_fast_accum=fast)


def run_and_compare(contract, kw, fast, form):
    fake = strict_scaled_mm(contract)
    got = fake(**kw, use_fast_accum=fast)
    if contract.returns_tuple:
        assert isinstance(got, tuple) and len(got) == 2
        got = got[0]
    want = cpu_result(kw, fast)
    assert got.dtype == want.dtype and torch.equal(got.float(), want.float())
    assert fake.calls == [form]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name,kwargs", VALID_TENSORWISE, ids=[v[0] for v in VALID_TENSORWISE])
@pytest.mark.parametrize("contract", CLAIMED, ids=ids(CLAIMED))
def test_tensorwise_accepted_everywhere_fp8_runs(contract, name, kwargs, fast):
    if not contract.fp8_supported():
        with pytest.raises(RuntimeError, match=NO_KERNEL_IMAGE):
            strict_scaled_mm(contract)(**kwargs(), use_fast_accum=fast)
        return
    run_and_compare(contract, kwargs(), fast, TENSORWISE)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name,kwargs", VALID_ROWWISE, ids=[v[0] for v in VALID_ROWWISE])
@pytest.mark.parametrize("contract", ROWWISE_OK, ids=ids(ROWWISE_OK))
def test_rowwise_accepted_where_supported(contract, name, kwargs, fast):
    run_and_compare(contract, kwargs(), fast, ROWWISE)


def test_padded_row_major_mat1_view_is_accepted():
    big = operands(k=80)[0]
    mat1, mat2 = big[:, :64], operands()[1]
    assert not mat1.is_contiguous()
    kw = call(input=mat1, mat2=mat2, scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    run_and_compare(ScaledMMContract((9, 0), (2, 7)), kw, False, TENSORWISE)


# -- torch 2.4's signature and tuple ---------------------------------------------------------

V24 = ScaledMMContract((9, 0), (2, 4))


def test_2_4_takes_no_scales_and_returns_out_and_amax():
    mat1, mat2 = operands()
    with pytest.raises(TypeError):
        torch._scaled_mm(mat1, mat2, out_dtype=torch.bfloat16)  # 2.5+ (and the CPU) need scales
    out, amax = strict_scaled_mm(V24)(mat1, mat2, out_dtype=torch.bfloat16)
    one = torch.tensor(1.0)
    assert torch.equal(out, CPU_SCALED_MM(mat1, mat2, one, one, out_dtype=torch.bfloat16))
    assert torch.isnan(amax)  # not computed for 16/32-bit outputs


def test_2_4_amax_for_float8_output():
    mat1, mat2 = operands()
    scale_a, scale_b = tensor_scales()
    out, amax = strict_scaled_mm(V24)(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=E4M3)
    full = CPU_SCALED_MM(mat1, mat2, scale_a, scale_b, out_dtype=torch.float32)
    assert out.dtype == E4M3 and amax.dtype == torch.float32 and amax.dim() == 0
    assert torch.equal(amax, full.abs().amax())


def test_2_4_scales_are_keyword_only():
    mat1, mat2 = operands()
    scale_a, scale_b = tensor_scales()
    CPU_SCALED_MM(mat1, mat2, scale_a, scale_b, out_dtype=torch.bfloat16)  # positional: fine from 2.5
    with pytest.raises(TypeError):
        strict_scaled_mm(V24)(mat1, mat2, scale_a, scale_b)
    with pytest.raises(TypeError):
        strict_scaled_mm(ScaledMMContract((9, 0), (2, 5)))(mat1, mat2, out_dtype=torch.bfloat16)


def test_2_4_has_no_rowwise_form():
    with pytest.raises(RuntimeError, match="scale_a must be float scalar"):
        strict_scaled_mm(V24)(**_rw())


# -- patching and helpers --------------------------------------------------------------------


def test_patched_scaled_mm_replaces_and_restores():
    original = torch._scaled_mm
    contract = ScaledMMContract((8, 9), (2, 5))
    with patched_scaled_mm(contract) as fake:
        assert torch._scaled_mm is fake and fake.contract.arch == (8, 9)
        torch._scaled_mm(**_tw())
        with pytest.raises(RuntimeError, match=NO_KERNEL_IMAGE):
            torch._scaled_mm(**_rw())
        assert fake.calls == [TENSORWISE]
    assert torch._scaled_mm is original


def test_patched_scaled_mm_restores_after_an_error():
    original = torch._scaled_mm
    with pytest.raises(RuntimeError), patched_scaled_mm(ScaledMMContract((9, 0), (2, 5))):
        torch._scaled_mm(**_tw(a=E5M2, b=E5M2))
    assert torch._scaled_mm is original


def test_cublas_trans_follows_the_strides():
    mat1, mat2 = operands()
    assert cublas_trans(mat1, mat2) == ("t", "n")
    assert cublas_trans(mat1.t().contiguous().t(), mat2) == ("t", "t")
    assert cublas_trans(mat1, mat2.contiguous()) == ("n", "n")
    assert cublas_trans(operands(k=80)[0][:, :64], mat2) == ("t", "n")  # padded row-major


def test_contract_is_frozen_and_validated():
    contract = ScaledMMContract((9, 0), (2, 5))
    with pytest.raises(AttributeError):
        contract.arch = (8, 9)
    with pytest.raises(ValueError):
        ScaledMMContract((9, 0), (2, 3))
    with pytest.raises(ValueError):
        ScaledMMContract((9, 0), (2, 5), platform="macos")
    assert str(contract) == "SM90 torch 2.5"
