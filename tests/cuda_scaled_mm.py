"""A strict CUDA stand-in for ``torch._scaled_mm`` that runs on the CPU.

The CPU ``torch._scaled_mm`` (torch 2.13) accepts calls that CUDA refuses: e5m2 x e5m2, a bias
with a float32 output, any bias dtype, K or N not a multiple of 16, a column-major mat1, a
row-major mat2, float64/bfloat16 scales, row-wise scales with a float32/float16 output or an e5m2
mat2, and row-wise scales on every architecture. :class:`ScaledMMContract` says, for one GPU
architecture and torch version band, which calls CUDA takes; :func:`strict_scaled_mm` wraps the real
CPU kernel so a test sees what a user on that GPU and torch would see: the same ``RuntimeError``
text, the 2.4 ``(out, amax)`` tuple and signature, or exactly the CPU result.

Which row-wise form runs where (Linux wheels; every band needs CC >= 8.9; see the table in
``tests/test_cuda_scaled_mm.py``)::

               torch 2.4          2.5-2.6                 >= 2.7 (2.7 is the strict representative)
    SM89       tensor-wise only   tensor-wise only        tensor-wise, row-wise
    SM90       tensor-wise only   tensor-wise, row-wise   tensor-wise, row-wise
    SM100      nothing (no build) nothing (no build)      tensor-wise (row-wise from 2.8)
    SM120      nothing (no build) nothing (no build)      tensor-wise (row-wise: never, strict)

Where each rule comes from (file, function, version). "2.3-era", "2.5/2.6-era" and "current" are
stored copies of pytorch/pytorch files read through the code index; release tags were not stored,
so a version is assigned from the PR dates against the release-branch cuts: release/2.4 cut by
2024-06-12 (PR #128514), 2.5 on 2024-09-09 (#135506), 2.6 on 2024-12-12 (#143085), 2.7 on
2025-03-12 (#149038), 2.8 around 2025-06-23..30.

- Arch gate, every band: Blas.cpp ``_scaled_mm_allowed_device`` (2.3/2.5-era) and
  ScaledBlasDeviceUtils.cpp ``scaled_mm_arch_allowed`` (current): ``major >= 9 or (8, 9)``, message
  "torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9, or
  ROCm MI300+".
- Blackwell needs torch >= 2.7 built with CUDA 12.8 (PyTorch 2.7 release notes, pytorch.github.io
  PR #1989; the 2.7.0 PyPI default was cu126 and refuses sm_120, see issue threads). Earlier wheels
  have no sm_100/sm_120 code: modelled as "no kernel image" for every call (text not verified).
- 2.4 signature and tuple: ``_scaled_mm(self, mat2, *, bias, out_dtype, scale_a=None, scale_b=None,
  scale_result, use_fast_accum) -> (Tensor, Tensor)`` (Blas.cpp 2.3-era ``_scaled_mm_out_cuda``
  returning ``{out, amax}``; test_matmul_cuda.py 2.3-era ``(out_fp8, amax_fp8) =
  torch._scaled_mm(x, y)``). PR #128683 (2024-06-14, after the 2.4 cut) made the scales required
  and dropped amax; vLLM's "scaled_mm returns tuple for torch < 2.5" and "scales no longer optional
  starting from 2.5" agree. Keyword-only scales in 2.4 are inferred from the 2.3 schema.
- 2.4 scales: Blas.cpp 2.3-era ``TORCH_CHECK(!scale_a || (numel()==1 && kFloat), "scale_a must be
  float scalar")``: no row-wise form at all (rowwise PR #128989 is dated 2024-06-18).
- 2.5-2.8 scales: Blas.cpp 2.5/2.6-era ``get_scaling_type``: float32 scales ("Both scale_a and
  scale_b must be float (fp32) tensors."); tensor-wise iff both numel()==1 (so [], [1], [1, 1]);
  otherwise both 2-D ("For non-TensorWise scaling, scale tensors must be 2-dimensional", PR
  #130059); row-wise iff (M, 1) and (1, N) and both contiguous; "Per-row scaling is not supported
  for this platform!" under MSVC; else "Invalid scaling configuration ...". Messages pinned by
  test_matmul_cuda.py ``test_float8_error_messages`` (2.6-era).
- >= 2.9 scales: ScaledBlas.cpp (current) ``get_joint_scaling`` / ``is_tensorwise_scaling`` /
  ``is_rowwise_scaling``: same forms, one "Invalid scaling configuration.\\n- For TensorWise ..."
  message (PR #158037, 2025-07-10, after the 2.8 cut).
- K and N multiples of 16, bias size, e5m2 x e5m2, bias dtype rules (bias bf16/fp16; not with a
  float32 output; bf16 bias for bf16/fp32 output, fp16 bias for fp16 output): ``_scaled_mm_out_cuda``
  in every stored version (2.3-era, 2.5/2.6-era, current ScaledBlas.cpp). M is free
  (``test_non_divisible_leading_dim``).
- Tensor-wise layout: ``cublasCommonArgs`` + ``TORCH_CHECK(transa == 't' && transb == 'n', "Only
  multiplication of row-major and column-major matrices is supported by cuBLASLt")`` in every
  band; current ScaledBlas.cpp ``_scaled_gemm`` only checks it on SM90 (Blackwell cuBLASLt takes all
  layouts, issue #152150; Ada cuBLASLt FP8 wants "TN" per the cuBLASLt docs). Strict here: TN
  everywhere. Output dtypes: cuBLASLt table in PR #107341 (e4m3 x e4m3 cannot give e5m2;
  test_matmul_cuda.py 2.3-era ``test_float8_basics``).
- Row-wise output dtype: Blas.cpp 2.5/2.6-era "Only bf16 high precsion output types are supported
  for row-wise scaling." (quoted with the typo fixed by torchao PR #2431, 2025-06). fp16 output on
  the CUTLASS path came with PR #166744 (2025-10-31), fp32 with #187569 (2026-06): not modelled,
  row-wise is bf16-only here (strict).
- Row-wise kernel: RowwiseScaledMM.cu ``check_inputs`` (2.6-era test text and current source):
  ``b.dtype() == kFloat8_e4m3fn`` (mat1 may be e5m2), ``a.stride(1) == 1``, ``a.stride(0) >=
  a.size(1)``, ``b.stride(0) == 1``, ``b.stride(1) >= b.size(0)``, bias 1-D contiguous.
- Row-wise availability: 2.5/2.6 kernel is sm90a-only (PR #125204/#128989 "We still do not build
  ... sm_90a"; issue #130359 L4 failure; tests skipped on sm89 by PRs #133612/#135718). SM89 came
  with PRs #144348/#145676 (January 2025, torch 2.7). SM100 kernel PRs #148274/#148421 (March
  2025, merge vs the 2.7 cut not verified: strict 2.8+). SM120: PR #155991 (June 2025, merge vs
  2.8 cut not verified), cuBLAS row-wise path not supported on sm_120 (PR #161236) and still
  failing with torch 2.10+cu130 (issue #192707): strict, never. RowwiseScaledMM.cu builds the
  kernel only ``!defined(_WIN32)``: no row-wise on Windows builds (strict: never; SM90 with
  cuBLAS >= 12.9 takes the cuBLASLt row-wise path from 2.9 and may work there).
- ``use_fast_accum``: cuBLASLt ``CUBLASLT_MATMUL_DESC_FAST_ACCUM`` for tensor-wise; selects the
  ``...FP8FastAccum`` CUTLASS schedule for row-wise (RowwiseScaledMM.cu ``Schedule``). Accepted
  everywhere, ignored by the CPU kernel (same result).

Exceptions: every rejection is a :class:`CudaScaledMMError` (a ``RuntimeError``). From torch 2.10
on, the checks that current ScaledBlas.cpp writes as ``TORCH_CHECK_VALUE`` raise
:class:`CudaScaledMMValueError`, which is also a ``ValueError``: real torch raises a plain
``ValueError`` there, so engine code must catch ``(RuntimeError, ValueError)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

TENSORWISE = "tensorwise"
ROWWISE = "rowwise"

ARCHS = {"SM89": (8, 9), "SM90": (9, 0), "SM100": (10, 0), "SM120": (12, 0)}
# Each band is represented by its strictest version: 2.5 for 2.5-2.6, 2.7 for everything later.
BANDS = {"2.4": (2, 4), "2.5-2.6": (2, 5), ">=2.7": (2, 7)}

ARCH_MESSAGE = (
    "torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9, or ROCm MI300+"
)
NO_KERNEL_IMAGE = "CUDA error: no kernel image is available for execution on the device"
ROWWISE_UNSUPPORTED = "Rowwise scaling is not currently supported on your device"
CUBLAS_NOT_SUPPORTED = "CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic( ...)`"
LAYOUT_MESSAGE = "Only multiplication of row-major and column-major matrices is supported by cuBLASLt"

_SCALAR_TYPE = {  # c10::ScalarType names, as TORCH_CHECK prints them
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    E4M3: "Float8_e4m3fn",
    E5M2: "Float8_e5m2",
    torch.float8_e4m3fnuz: "Float8_e4m3fnuz",
    torch.float8_e5m2fnuz: "Float8_e5m2fnuz",
}
_FLOAT8 = (E4M3, E5M2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


class CudaScaledMMError(RuntimeError):
    """What ``torch._scaled_mm`` raises on CUDA for this call (text as close as the sources tell)."""


class CudaScaledMMValueError(CudaScaledMMError, ValueError):
    """A ``TORCH_CHECK_VALUE`` rejection (torch >= 2.10): real torch raises a plain ValueError."""


def _name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE.get(dtype, str(dtype).removeprefix("torch."))


def _sizes(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dense(t: torch.Tensor) -> bool:
    """``is_non_overlapping_and_dense`` for a strided tensor."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _transpose_flag(t: torch.Tensor) -> bool:
    """``prepare_matrix_for_cublas``'s transpose flag (Blas.cpp; the clone path counts as row-major)."""
    if _dense(t):
        return t.is_contiguous()
    rows, (s0, s1) = t.shape[0], t.stride()
    # column-major with a padded leading dimension is the one False; the rest is row-major
    # (padded leading dimension) or gets cloned contiguous
    return not (s0 == 1 and s1 >= max(1, rows))


def cublas_trans(mat1: torch.Tensor, mat2: torch.Tensor) -> tuple[str, str]:
    """(transa, transb) as ``cublasCommonArgs`` computes them for a contiguous [M, N] output.

    The output is row-major, so cuBLAS computes out^T = mat2^T @ mat1^T: ``a`` is mat2, ``b`` is
    mat1, and both flags are flipped. 't', 'n' is the one combination FP8 takes.
    """
    transa = not _transpose_flag(mat2)
    transb = not _transpose_flag(mat1)
    return ("t" if transa else "n"), ("t" if transb else "n")


@dataclasses.dataclass(frozen=True)
class ScaledMMContract:
    """What CUDA's ``torch._scaled_mm`` accepts on GPU ``arch`` (compute capability) under torch
    ``torch_version`` (major, minor), official ``platform`` wheels ("linux" or "windows").

    ``arch`` is what the engine's device-capability seam should report in a test.
    """

    arch: tuple[int, int]
    torch_version: tuple[int, int]
    platform: str = "linux"

    def __post_init__(self):
        if self.platform not in ("linux", "windows"):
            raise ValueError(f"platform must be 'linux' or 'windows', got {self.platform!r}")
        if tuple(self.torch_version) < (2, 4):
            raise ValueError("the contract starts at torch 2.4 (the project's floor)")

    def __str__(self) -> str:
        win = ", windows" if self.platform == "windows" else ""
        return f"SM{self.arch[0]}{self.arch[1]} torch {self.torch_version[0]}.{self.torch_version[1]}{win}"

    # -- what exists -------------------------------------------------------------------------
    @property
    def band(self) -> str:
        v = tuple(self.torch_version)
        return "2.4" if v < (2, 5) else "2.5-2.6" if v < (2, 7) else ">=2.7"

    @property
    def returns_tuple(self) -> bool:
        """torch 2.4 returns ``(out, amax)``; 2.5+ returns ``out``."""
        return tuple(self.torch_version) < (2, 5)

    @property
    def scales_optional(self) -> bool:
        """torch 2.4 takes keyword-only, optional scales (None means 1.0)."""
        return tuple(self.torch_version) < (2, 5)

    def build_has_arch(self) -> bool:
        """Official wheels carry kernels for this GPU (Blackwell needs torch >= 2.7 + CUDA 12.8)."""
        return not (self.arch[0] >= 10 and tuple(self.torch_version) < (2, 7))

    def fp8_supported(self) -> bool:
        """Any ``_scaled_mm`` call can run (the tensor-wise form then works)."""
        return self.build_has_arch() and (self.arch[0] >= 9 or tuple(self.arch) == (8, 9))

    def rowwise_unavailable_reason(self) -> str | None:
        """Why a well-formed row-wise call fails here (the error CUDA gives), or None if it runs."""
        if not self.fp8_supported():
            return NO_KERNEL_IMAGE if not self.build_has_arch() else ARCH_MESSAGE
        v, major = tuple(self.torch_version), self.arch[0]
        if v < (2, 5):
            return "scale_a must be float scalar"  # 2.4 has no row-wise form
        if self.platform == "windows":  # RowwiseScaledMM.cu: BUILD_ROWWISE_FP8_KERNEL needs !_WIN32
            return "Per-row scaling is not supported for this platform!" if v < (2, 9) else ROWWISE_UNSUPPORTED
        if major == 9:
            return None
        if v < (2, 7):  # the CUTLASS kernel is compiled for sm_90a only
            return NO_KERNEL_IMAGE
        if tuple(self.arch) == (8, 9):
            return None
        if major in (10, 11):
            return None if v >= (2, 8) else ROWWISE_UNSUPPORTED
        return ROWWISE_UNSUPPORTED if v < (2, 9) else CUBLAS_NOT_SUPPORTED  # sm_12x: never, strictly

    def rowwise_supported(self) -> bool:
        return self.rowwise_unavailable_reason() is None

    # -- the check ---------------------------------------------------------------------------
    def _fail(self, message: str, value_check: bool = False):
        if value_check and tuple(self.torch_version) >= (2, 10):
            raise CudaScaledMMValueError(message)
        raise CudaScaledMMError(message)

    def check(
        self,
        mat1: torch.Tensor,
        mat2: torch.Tensor,
        scale_a: torch.Tensor | None,
        scale_b: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        scale_result: torch.Tensor | None = None,
        use_fast_accum: bool = False,
    ) -> str:
        """Raise what CUDA raises for this call; return the form that runs ("tensorwise"/"rowwise").

        ``use_fast_accum`` is accepted in every form and band (it picks a kernel, not a contract).
        """
        v = tuple(self.torch_version)
        if not self.build_has_arch():
            self._fail(NO_KERNEL_IMAGE)
        if not self.fp8_supported():
            self._fail(ARCH_MESSAGE)
        if mat1.dim() != 2:
            self._fail("mat1 must be a matrix")
        if mat2.dim() != 2:
            self._fail("mat2 must be a matrix")
        (m, k), (k2, n) = mat1.shape, mat2.shape
        if k != k2:
            self._fail(f"mat1 and mat2 shapes cannot be multiplied ({m}x{k} and {k2}x{n})")
        if (scale_a is None or scale_b is None) and not self.scales_optional:
            # the Python binding refuses before CUDA sees the call
            raise TypeError('_scaled_mm() missing required positional argument: "scale_a", "scale_b"')
        if v < (2, 5):
            form = self._scales_2_4(scale_a, scale_b)
        elif v < (2, 9):
            form = self._scales_2_5(scale_a, scale_b, m, n)
        else:
            form = self._scales_2_9(mat1, mat2, scale_a, scale_b)

        if scale_result is not None and not (scale_result.numel() == 1 and scale_result.dtype == torch.float32):
            self._fail("scale_result must be a float scalar")
        if bias is not None and bias.numel() != n:
            self._fail(f"Bias must be size {n} but got {bias.numel()}")
        if k % 16:
            close = "." if v < (2, 5) else ")."
            self._fail(f"Expected trailing dimension of mat1 to be divisible by 16 but got mat1 shape: ({m}x{k}{close}")
        if k2 % 16 or n % 16:
            close = "" if v < (2, 5) else ")"
            self._fail(f"mat2 shape ({k2}x{n}{close} must be divisible by 16")
        out = out_dtype if out_dtype is not None else mat1.dtype
        if mat1.dtype not in _FLOAT8:
            self._fail(f"Expected mat1 to be Float8 matrix got {_name(mat1.dtype)}")
        if mat2.dtype not in _FLOAT8:
            self._fail(f"Expected mat2 to be Float8 matrix got {_name(mat2.dtype)}")
        if mat1.dtype == E5M2 and mat2.dtype == E5M2:
            self._fail("Multiplication of two Float8_e5m2 matrices is not supported", value_check=True)
        if bias is not None:
            self._check_bias(bias, out)
        others = [t for t in (mat2, scale_a, scale_b, bias, scale_result) if t is not None]
        if any(t.device != mat1.device for t in others):
            self._fail("Expected all tensors to be on the same device")
        if m == 0 or k == 0 or n == 0:
            return form  # _scaled_mm_out_cuda returns early (zeros when K == 0)
        if form == ROWWISE:
            self._rowwise_kernel(mat1, mat2, bias, out)
        else:
            self._tensorwise_gemm(mat1, mat2, out)
        return form

    def _scales_2_4(self, scale_a, scale_b) -> str:
        # Blas.cpp 2.3-era: optional scales, each a float32 scalar
        if scale_a is not None and not (scale_a.numel() == 1 and scale_a.dtype == torch.float32):
            self._fail("scale_a must be float scalar")
        if scale_b is not None and not (scale_b.numel() == 1 and scale_b.dtype == torch.float32):
            self._fail("scale_b must be a float scalar")
        return TENSORWISE

    def _scales_2_5(self, scale_a, scale_b, m: int, n: int) -> str:
        # Blas.cpp 2.5/2.6-era get_scaling_type
        if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
            self._fail("Both scale_a and scale_b must be float (fp32) tensors.")
        if scale_a.numel() == 1 and scale_b.numel() == 1:
            return TENSORWISE
        if scale_a.dim() != 2 or scale_b.dim() != 2:
            self._fail(
                "For non-TensorWise scaling, scale tensors must be 2-dimensional, but got "
                f"scale_a.dim()={scale_a.dim()} and scale_b.dim()={scale_b.dim()}"
            )
        if tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n):
            if self.platform == "windows":  # #if !defined(USE_ROCM) && !defined(_MSC_VER)
                self._fail("Per-row scaling is not supported for this platform!")
            if not (scale_a.is_contiguous() and scale_b.is_contiguous()):
                self._fail("Both scale_a and scale_b must be contiguous for RowWise scaling.")
            return ROWWISE
        (a0, a1), (b0, b1) = scale_a.shape, scale_b.shape
        self._fail(
            "Invalid scaling configuration. For TensorWise scaling, both scales should be scalar. "
            f"For RowWise scaling, scale_a should be ({m}, 1) and scale_b should be (1, {n}). "
            f"Got scale_a.size()=({a0}, {a1}) and scale_b.size()=({b0}, {b1})"
        )

    def _scales_2_9(self, mat1, mat2, scale_a, scale_b) -> str:
        # ScaledBlas.cpp (current) get_joint_scaling: TensorWise first, then RowWise
        fp8 = mat1.dtype in _FLOAT8 and mat2.dtype in _FLOAT8
        floats = scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32
        if fp8 and floats and scale_a.numel() == 1 and scale_b.numel() == 1:
            return TENSORWISE
        m, n = mat1.shape[0], mat2.shape[1]
        if (
            fp8
            and floats
            and tuple(scale_a.shape) == (m, 1)
            and tuple(scale_b.shape) == (1, n)
            and scale_a.is_contiguous()
            and scale_b.t().is_contiguous()
        ):
            return ROWWISE
        self._fail(
            "Invalid scaling configuration.\n"
            "- For TensorWise scaling, a and b should be float8, scales should be float and singletons.\n"
            f"- For RowWise scaling, a and b should be float8, scales should be float, scale_a should be ({m}, 1) "
            f"and scale_b should be (1, {n}), and both should be contiguous.\n"
            f"Got a.dtype()={_name(mat1.dtype)}, scale_a.dtype()={_name(scale_a.dtype)}, "
            f"scale_a.size()={_sizes(scale_a)}, scale_a.stride()={list(scale_a.stride())}, "
            f"b.dtype()={_name(mat2.dtype)}, scale_b.dtype()={_name(scale_b.dtype)}, "
            f"scale_b.size()={_sizes(scale_b)} and scale_b.stride()={list(scale_b.stride())}"
        )

    def _check_bias(self, bias: torch.Tensor, out: torch.dtype) -> None:
        v = tuple(self.torch_version)
        if out == torch.float32:
            self._fail("Bias is not supported when out_dtype is set to Float32")
        if bias.dtype not in (torch.bfloat16, torch.float16):
            either = "either Half or BFloat16" if v < (2, 9) else "BFloat16 or Half"
            self._fail(f"Bias must be {either}, but got {_name(bias.dtype)}")
        if out == torch.bfloat16 and bias.dtype != torch.bfloat16:
            self._fail(f"Bias must be BFloat16 to compute {_name(out)} output, but got {_name(bias.dtype)}")
        if out == torch.float16 and bias.dtype != torch.float16:
            self._fail(f"Bias must be Float16 to compute {_name(out)} output, but got {_name(bias.dtype)}")
        if bias.dim() != 1 or not bias.is_contiguous():
            # cuBLASLt reads bias->data_ptr() as a dense vector; RowwiseScaledMM.cu checks dim()==1, stride(0)==1
            self._fail("Expected bias->dim() == 1 && bias->stride(0) == 1 to be true, but got false.")

    def _tensorwise_gemm(self, mat1, mat2, out: torch.dtype) -> None:
        transa, transb = cublas_trans(mat1, mat2)
        if (transa, transb) != ("t", "n"):
            self._fail(LAYOUT_MESSAGE)
        if mat1.dtype not in (E4M3, E5M2) or mat2.dtype not in (E4M3, E5M2):
            self._fail(CUBLAS_NOT_SUPPORTED)  # fnuz formats are ROCm's
        outputs = {torch.float16, torch.bfloat16, torch.float32, E4M3}
        if E5M2 in (mat1.dtype, mat2.dtype):
            outputs.add(E5M2)
        if out not in outputs:
            self._fail(CUBLAS_NOT_SUPPORTED)

    def _rowwise_kernel(self, mat1, mat2, bias, out: torch.dtype) -> None:
        v = tuple(self.torch_version)
        if out != torch.bfloat16:
            spelling = "precsion" if v < (2, 7) else "precision"
            self._fail(f"Only bf16 high {spelling} output types are supported for row-wise scaling.", True)
        reason = self.rowwise_unavailable_reason()
        if reason is not None:
            self._fail(reason)
        # RowwiseScaledMM.cu check_inputs
        if mat2.dtype != E4M3:
            self._fail("Expected b.dtype() == at::kFloat8_e4m3fn to be true, but got false.")
        for ok, text in (
            (mat1.stride(1) == 1, "a.stride(1) == 1"),
            (mat1.stride(0) >= mat1.size(1), "a.stride(0) >= a.size(1)"),
            (mat2.stride(0) == 1, "b.stride(0) == 1"),
            (mat2.stride(1) >= mat2.size(0), "b.stride(1) >= b.size(0)"),
        ):
            if not ok:
                self._fail(f"Expected {text} to be true, but got false.")


# The combinations the project claims: SM89, SM90, SM100, SM120 x torch 2.4, 2.5-2.6, >= 2.7
# (Linux wheels; each band at its strictest version).
CLAIMED = [ScaledMMContract(arch, version) for arch in ARCHS.values() for version in BANDS.values()]

_P = inspect.Parameter
_SIGNATURE_2_4 = inspect.Signature(
    [_P("input", _P.POSITIONAL_OR_KEYWORD), _P("mat2", _P.POSITIONAL_OR_KEYWORD)]
    + [
        _P(name, _P.KEYWORD_ONLY, default=default)
        for name, default in (
            ("bias", None),
            ("out_dtype", None),
            ("scale_a", None),
            ("scale_b", None),
            ("scale_result", None),
            ("use_fast_accum", False),
        )
    ]
)
_SIGNATURE_2_5 = inspect.Signature(
    [_P(name, _P.POSITIONAL_OR_KEYWORD) for name in ("input", "mat2", "scale_a", "scale_b")]
    + [
        _P(name, _P.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (("bias", None), ("scale_result", None), ("out_dtype", None), ("use_fast_accum", False))
    ]
)


class StrictScaledMM:
    """``torch._scaled_mm`` as CUDA would run it under ``contract``, computed by the CPU kernel.

    ``calls`` lists the form of every accepted call ("tensorwise" / "rowwise"), for tests that want
    to know which form an engine used.
    """

    def __init__(self, contract: ScaledMMContract):
        self.contract = contract
        self.calls: list[str] = []
        self.__signature__ = _SIGNATURE_2_4 if contract.scales_optional else _SIGNATURE_2_5

    def __repr__(self) -> str:
        return f"<strict torch._scaled_mm for {self.contract}>"

    def __call__(self, *args, **kwargs):
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"_scaled_mm(): {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        mat1, mat2, bias = a["input"], a["mat2"], a["bias"]
        scale_a, scale_b = a["scale_a"], a["scale_b"]
        out_dtype, scale_result, fast = a["out_dtype"], a["scale_result"], a["use_fast_accum"]
        form = self.contract.check(mat1, mat2, scale_a, scale_b, bias, out_dtype, scale_result, fast)
        if scale_a is None:
            scale_a = torch.ones((), dtype=torch.float32, device=mat1.device)
        if scale_b is None:
            scale_b = torch.ones((), dtype=torch.float32, device=mat1.device)
        real = torch.ops.aten._scaled_mm  # the op itself: unaffected by patching torch._scaled_mm
        out = real(mat1, mat2, scale_a, scale_b, bias, scale_result, out_dtype, fast)
        self.calls.append(form)
        if not self.contract.returns_tuple:
            return out
        # 2.4: amax of the result before scale_result for float8 outputs; not computed (NaN here) otherwise
        if out.dtype in _FLOAT8:
            amax = real(mat1, mat2, scale_a, scale_b, None, None, torch.float32, fast)
            if bias is not None:
                amax = amax + bias.float()
            amax = amax.abs().amax()
        else:
            amax = torch.full((), float("nan"), dtype=torch.float32, device=out.device)
        return out, amax


def strict_scaled_mm(contract: ScaledMMContract) -> StrictScaledMM:
    """A function with ``torch._scaled_mm``'s signature for ``contract``'s torch band."""
    return StrictScaledMM(contract)


@contextlib.contextmanager
def patched_scaled_mm(contract: ScaledMMContract) -> Iterator[StrictScaledMM]:
    """Replace ``torch._scaled_mm`` by the strict stand-in for the duration of the block.

    Code calling ``torch._scaled_mm`` sees CUDA's contract; ``torch.ops.aten._scaled_mm`` is left
    alone. The device capability is not faked: give the engine ``contract.arch`` through its seam.
    """
    fake = strict_scaled_mm(contract)
    original = torch._scaled_mm
    torch._scaled_mm = fake
    try:
        yield fake
    finally:
        torch._scaled_mm = original
