"""`torch.export` of a build's model: the one trace every program-based stage shares, and its check against eager."""

from __future__ import annotations

from typing import Any

import torch

from exporter.build_inputs import BuildError


def trace(model: Any, input_shape: tuple[int, int, int], *, static_batch: int | None, max_batch: int,
          diagnostics: dict[str, Any] | None = None, device: str = "cpu") -> Any:
    """`torch.export` the model (on `device`) once, with a dynamic batch dimension 1..max_batch unless `static_batch`.

    The Dynamo tracer (`strict=True`, what torch.compile uses) goes first; if it cannot trace the code, the
    non-strict tracer is tried and the fallback is recorded in `diagnostics["export"]`.
    """
    example_batch = static_batch or 2  # torch.export specialises a batch of 1
    example = torch.rand((example_batch, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    dynamic_shapes = None if static_batch else ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)
    info: dict[str, Any] = {"example_batch": example_batch, "dynamic_batch": static_batch is None}
    if diagnostics is not None:
        diagnostics["export"] = info
    errors = []
    for strict in (True, False):
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:  # noqa: BLE001  (reported below, or by the fallback's success)
            errors.append(exc)
            info[f"{'strict' if strict else 'non_strict'}_error"] = _first_line(exc)
            continue
        info["tracer"] = "dynamo (strict)" if strict else "non-strict (Dynamo could not trace the code)"
        return program
    exc = errors[-1]
    text = f"{exc}"
    hint = (" (the code fixes the batch size: fix it or build with --batch N)"
            if "Constraints violated" in text or "specializ" in text else "")
    raise BuildError(f"torch.export failed for the model: {_first_line(errors[0])}{hint}") from exc


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def check_program_batches(program: Any, model: Any, input_shape: tuple[int, int, int],
                          batches: tuple[int, ...]) -> None:
    """The traced program must match eager at each batch size (catches a silently specialised batch)."""
    module = program.module()
    for batch in batches:
        x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            try:
                got = module(x)
            except Exception as exc:
                raise BuildError(f"the traced program fails at batch {batch}: "
                                 f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
            want = model(x)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise BuildError(f"the traced program differs from the model at batch {batch}")
