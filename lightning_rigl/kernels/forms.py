"""The compressed forms of a masked weight, built once per mask: CSR (with 32-bit indices, which MKL and cuSPARSE
take without a conversion on every call), its transpose, and the condensed form of a constant fan-in.

A weight of any shape is read as a matrix (rows, fan-in): a linear layer's (out, in), a convolution's
(out, in·kh·kw).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


def to_csr(weight: Tensor, mask: Tensor) -> Tensor:
    """The weight's live entries as a CSR matrix (rows, fan-in) with int32 indices; the values are copied."""
    pattern = LivePattern.of(mask)
    return pattern.csr(pattern.values(weight.detach()))


def sparse_csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor over given indices, without the beta warning and without checking the indices again."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass(frozen=True)
class LivePattern:
    """Where a weight is live, in the index forms the sparse kernels read; values are read from the weight
    itself on each use (``values``), so they follow the optimizer without being copied back.

    Attributes:
        shape: the weight read as (rows, fan-in).
        crow, col: the CSR indices (int32) of the live entries, row by row, columns increasing.
        positions: each live entry's position in the flattened weight (int64), in CSR order.
        crow_t, col_t: the CSR indices (int32) of the transpose (fan-in, rows).
        order_t: for each entry of the transpose in its CSR order, its index in the CSR order (int64).
    """

    shape: tuple[int, int]
    crow: Tensor
    col: Tensor
    positions: Tensor
    crow_t: Tensor
    col_t: Tensor
    order_t: Tensor

    @classmethod
    def of(cls, mask: Tensor) -> LivePattern:
        """The pattern of a bool mask of the weight's shape (True: live)."""
        rows = mask.reshape(mask.shape[0], -1)
        n_rows, fan_in = rows.shape
        positions = rows.reshape(-1).nonzero().squeeze(1)
        row, col = positions // fan_in, positions % fan_in
        order_t = (col * n_rows + row).argsort()
        return cls(
            shape=(n_rows, fan_in),
            crow=_crow(row, n_rows),
            col=col.int(),
            positions=positions,
            crow_t=_crow(col.take(order_t), fan_in),
            col_t=row.take(order_t).int(),
            order_t=order_t,
        )

    @property
    def nnz(self) -> int:
        """Live entries."""
        return self.positions.numel()

    def values(self, weight: Tensor) -> Tensor:
        """The weight's live values in CSR order (a gather: no pass over the dead entries)."""
        return weight.reshape(-1).take(self.positions)

    def dense(self, values: Tensor, shape: torch.Size) -> Tensor:
        """A tensor of ``shape`` (the weight's) holding ``values`` (in CSR order) at the live positions, 0
        elsewhere."""
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        out.view(-1).index_copy_(0, self.positions, values)
        return out

    def csr(self, values: Tensor) -> Tensor:
        """The (rows, fan-in) CSR matrix holding ``values`` (in CSR order)."""
        return sparse_csr(self.crow, self.col, values, self.shape)

    def csr_t(self, values: Tensor) -> Tensor:
        """The transpose, (fan-in, rows), as a CSR matrix holding ``values`` (given in the untransposed order)."""
        return sparse_csr(self.crow_t, self.col_t, values.take(self.order_t), (self.shape[1], self.shape[0]))


def _crow(row: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers (int32) of sorted row indices."""
    counts = torch.bincount(row, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()


def condense(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A constant fan-in weight's condensed form: (indices, values), each (out, k), k the live weights of every
    neuron that has any (columns of the weight read as (out, fan_in), in increasing order); an ablated neuron
    gets k zero values at column 0.

    Raises:
        ValueError: the neurons hold different numbers of live weights.
    """
    rows = mask.reshape(mask.shape[0], -1)
    fan_ins = rows.sum(1)
    k = int(fan_ins.max())
    if bool(((fan_ins != k) & (fan_ins != 0)).any()):
        raise ValueError("condense needs a constant fan-in: every neuron with live weights must hold as many.")
    padded = rows.clone()
    padded[fan_ins == 0, :k] = True  # an ablated neuron reads k zero weights
    indices = padded.nonzero()[:, 1].view(rows.shape[0], k)
    values = torch.where(rows, weight.detach().reshape(rows.shape), 0).gather(1, indices)
    return indices, values
