"""Guards of the engine's inputs and arithmetic: refuse NaN/Inf before they rank (NaN compares
false with everything), and keep float32 products at full precision where the exact bound
needs them."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mmca.errors import NonFiniteError


def require_finite(x: torch.Tensor, what: str, item: str | None = None, offset: int = 0) -> None:
    """Raise a NonFiniteError naming `what` (and the first bad `item` row) if `x` holds NaN/Inf:
    NaN compares false with everything, so it would silently rank first (R@1 = 100)."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    where = ""
    if item is not None and x.dim() > 0:
        bad = int((~finite.reshape(len(x), -1).all(1)).nonzero()[0])
        where = f" ({item} {offset + bad})"
    kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
    raise NonFiniteError(f"{what} contain {kind}{where}: no metric or ranking can be computed from them",
                         "check the features (re-run `mmca prepare --force`) and the checkpoint "
                         "(a diverged run: resume from an earlier last.pt with a lower learning rate)")


def require_finite_weights(model) -> None:
    """Every parameter finite (one device sync for all of them), else name the first bad one."""
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        name, p = next((n, p) for n, p in params if not bool(torch.isfinite(p).all()))
        require_finite(p, f"the model's weights ({name})")


@contextmanager
def full_fp32():
    """Float32 matrix products at full precision for the duration, whatever the global setting:
    TF32 (a common global switch on GPUs) moves i0·c0 by ~1e-3, far beyond the exact bound's slack."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)
