"""Our own CPU kernels for the three products of a sparse layer's training step, compiled on first use.

The live values come gathered once per forward (a compact array, read many times); all three work on activations
laid out (features, N): a row per feature, N the batch's rows (tokens, pixels),
so that every inner loop runs over N contiguous numbers and vectorizes, and each live weight costs one pass over
one such row:

- ``forward``: yᵀ[r] = Σⱼ vⱼ · xᵀ[colⱼ] over row r's live weights (an axpy per live weight);
- ``input_grad``: the same product with the transpose's indices (built once per mask), reading the values
  through the transpose's order;
- ``weight_grad``: gᵀ[r] · xᵀ[colⱼ] (a dot product) for each live weight j of row r: the gradient's live values
  in CSR order, no work at the dead positions.

Rows are shared among torch's intra-op threads (``torch.set_num_threads``). The source is compiled with
``torch.utils.cpp_extension`` (g++ and Python's headers needed; about half a minute, once per machine type, cached
by torch under ``TORCH_EXTENSIONS_DIR``) for this machine's instruction set. Where it cannot be built, ``load``
returns None, says why once in the log, and the sparse products run through torch's own CSR operations.
Set ``LIGHTNING_RIGL_NATIVE=0`` to skip it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>

namespace {

// Columns of N held in registers at once: 64 floats (four AVX-512 or eight AVX2 registers of accumulators).
template <typename T> constexpr int64_t WIDTH = 256 / sizeof(T);
constexpr int32_t AHEAD = 8;  // live weights ahead whose input rows are prefetched (their columns are random)

// y_t[r, n0:n0+w] = sum_j v_j * x_t[col_j, n0:n0+w], the accumulators in registers for a full chunk; v_j is
// val[j], or val[order[j]] for the transpose.
template <typename T, int64_t W>
inline void axpy_chunk(const int32_t* __restrict col, const T* __restrict val, const int64_t* __restrict order,
                       int32_t first, int32_t last, const T* __restrict x_t, T* __restrict out, int64_t out_stride,
                       int64_t n, int64_t n0, int64_t w) {
  T acc[W] = {};
  for (int32_t j = first; j < last; ++j) {
    if (j + AHEAD < last) __builtin_prefetch(x_t + static_cast<int64_t>(col[j + AHEAD]) * n + n0);
    const T v = order ? val[order[j]] : val[j];
    const T* __restrict in = x_t + static_cast<int64_t>(col[j]) * n + n0;
    if (w == W) {
#pragma omp simd
      for (int64_t k = 0; k < W; ++k) acc[k] += v * in[k];
    } else {
      for (int64_t k = 0; k < w; ++k) acc[k] += v * in[k];
    }
  }
  for (int64_t k = 0; k < w; ++k) out[k * out_stride] = acc[k];
}

// Row r of the product goes to y[r, :] of a (rows, N) output, or to y[:, r] of an (N, rows) one (rows_last): the
// second saves the caller a transpose, and consecutive rows fill the same cache lines.
template <typename T>
void axpy_rows(const int32_t* crow, const int32_t* col, const T* val, const int64_t* order, const T* x_t, T* y,
               int64_t rows, int64_t n, bool rows_last) {
  constexpr int64_t W = WIDTH<T>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n0 = 0; n0 < n; n0 += W) {
        T* out = rows_last ? y + n0 * rows + r : y + r * n + n0;
        axpy_chunk<T, W>(col, val, order, crow[r], crow[r + 1], x_t, out, rows_last ? rows : 1, n, n0,
                         std::min(W, n - n0));
      }
    }
  });
}

// out[j] = g_t[r] . x_t[col_j] for each live weight j of row r (CSR order).
template <typename T>
void dots_rows(const int32_t* crow, const int32_t* col, const T* g_t, const T* x_t, T* out, int64_t rows,
               int64_t n) {
  constexpr int64_t W = WIDTH<T>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t first = crow[r], last = crow[r + 1];
      std::fill(out + first, out + last, T(0));
      for (int64_t n0 = 0; n0 < n; n0 += W) {
        const int64_t w = std::min(W, n - n0);
        T g[W] = {};
        std::copy(g_t + r * n + n0, g_t + r * n + n0 + w, g);
        for (int32_t j = first; j < last; ++j) {
          if (j + AHEAD < last) __builtin_prefetch(x_t + static_cast<int64_t>(col[j + AHEAD]) * n + n0);
          const T* __restrict x = x_t + static_cast<int64_t>(col[j]) * n + n0;
          T acc = 0;
          if (w == W) {
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < W; ++k) acc += g[k] * x[k];
          } else {
            for (int64_t k = 0; k < w; ++k) acc += g[k] * x[k];
          }
          out[j] += acc;
        }
      }
    }
  });
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, " must be a contiguous CPU tensor");
}

}  // namespace

// M @ x_t (k, N), M a CSR matrix (crow, col, values[j] or, given order, values[order[j]]): as (rows, N), or as its
// transpose (N, rows) when rows_last.
torch::Tensor product(torch::Tensor x_t, torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                      c10::optional<torch::Tensor> order, bool rows_last) {
  check(x_t, "x_t"); check(crow, "crow"); check(col, "col"); check(values, "values");
  TORCH_CHECK(values.scalar_type() == x_t.scalar_type(), "values must have x_t's dtype");
  const int64_t rows = crow.numel() - 1, n = x_t.size(1);
  auto y = rows_last ? torch::empty({n, rows}, x_t.options()) : torch::empty({rows, n}, x_t.options());
  const int64_t* order_ptr = nullptr;
  if (order.has_value()) { check(*order, "order"); order_ptr = order->data_ptr<int64_t>(); }
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "product", [&] {
    axpy_rows<scalar_t>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), order_ptr,
                        x_t.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, n, rows_last);
  });
  return y;
}

// x (R, C) -> x^T (C, R), contiguous, through 32x32 tiles shared among the threads.
torch::Tensor transpose(torch::Tensor x) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 2, "transpose takes a matrix");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto out = torch::empty({cols, rows}, x.options());
  constexpr int64_t TILE = 32;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "transpose", [&] {
    const scalar_t* __restrict in = x.data_ptr<scalar_t>();
    scalar_t* __restrict o = out.data_ptr<scalar_t>();
    const int64_t tiles = (cols + TILE - 1) / TILE;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tc = begin; tc < end; ++tc) {
        const int64_t c0 = tc * TILE, c1 = std::min(c0 + TILE, cols);
        for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
          const int64_t r1 = std::min(r0 + TILE, rows);
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t r = r0; r < r1; ++r) o[c * rows + r] = in[r * cols + c];
        }
      }
    });
  });
  return out;
}

// The gradient g_t (rows, N) @ x_t (fan_in, N)^T at the CSR's live positions only: one value per live weight, in
// CSR order.
torch::Tensor live_values(torch::Tensor g_t, torch::Tensor x_t, torch::Tensor crow, torch::Tensor col) {
  check(g_t, "g_t"); check(x_t, "x_t"); check(crow, "crow"); check(col, "col");
  const int64_t rows = crow.numel() - 1, n = g_t.size(1);
  TORCH_CHECK(g_t.size(0) == rows && x_t.size(1) == n, "g_t must be (rows, N) and x_t (fan_in, N)");
  auto out = torch::empty({col.numel()}, g_t.options());
  AT_DISPATCH_FLOATING_TYPES(g_t.scalar_type(), "live_values", [&] {
    dots_rows<scalar_t>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), g_t.data_ptr<scalar_t>(),
                        x_t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("product", &product, "CSR times dense, activations (features, N)");
  m.def("live_values", &live_values, "the weight gradient at the live positions, in CSR order");
  m.def("transpose", &transpose, "a matrix's transpose, contiguous");
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp"]


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels, or None where they cannot be built here (the reason is logged once)."""
    if os.environ.get("LIGHTNING_RIGL_NATIVE", "1") == "0":
        log.info("native sparse kernels off (LIGHTNING_RIGL_NATIVE=0): torch's CSR operations run instead")
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline(name=f"lightning_rigl_kernels_{_build_key()}", cpp_sources=[_SOURCE],
                           extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], with_cuda=False, verbose=False)
    except Exception as error:  # no compiler, no Python headers, a read-only cache: torch's CSR operations remain
        log.warning("native sparse kernels unavailable (%s: %s): torch's CSR operations run instead",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return None


def _build_key() -> str:
    """Source and machine type: -march=native code must not run on another instruction set (a cluster's nodes
    may share the cache directory)."""
    digest = hashlib.sha256(_SOURCE.encode())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(_cpu_flags().encode())
    digest.update(platform.machine().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
