"""``MonteCarloArithmetic``: the ``TorchDispatchMode`` that stochastically rounds the floating-point aten results
of the code it runs (the one job of this module: dispatch; rounding, noise, dtypes and routes live beside it).

Each perturbed op (:mod:`.ops` decides which) whose results PyTorch types float32, float16 or bfloat16
(:mod:`.dtypes`) is recomputed in the high dtype of its working dtype (float64 for float32, float32 for float16
and bfloat16), its inputs entering as PyTorch's kernels take them, and each floating result is rounded back by
the op's :class:`.rounder.Rounder`:

* ``granularity="op"``: one rounding per result of each aten op, of the op's result computed in the high dtype;
  convolutions accumulate in float64 (:mod:`.conv`). The model of stochastic rounding applied at an
  accumulator's output.
* ``granularity="instruction"``: the ops of :data:`.routes.INSTRUCTION_LEVEL_OPS` run as sequences of rounded
  float32 multiplies and additions in the lane order of :mod:`.lanes` (Verificarlo's model of one rounding per
  instruction, in an order of our choosing); every other op is one rounding of its high-precision result.

Not perturbed: ops that do no rounding (:data:`.ops.NO_ROUNDING`, views), float64 results (float64 is the high
precision), integer and boolean results, sparse and complex tensors. Random words come from the counter-based
noise of :mod:`.noise`, keyed by (stream or seed, epoch) and addressed by (iteration, op, rounding): the global
RNG is never touched, and the noise does not depend on thread count, tensor sizes elsewhere or device.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from nnunet_varaug.training.numerics import dtypes as dt
from nnunet_varaug.training.numerics.fused import FUSED
from nnunet_varaug.training.numerics.kernels import single_thread
from nnunet_varaug.training.numerics.noise import GENERATOR, CounterNoise, DirectedNoise, noise_identity
from nnunet_varaug.training.numerics.ops import plan_for
from nnunet_varaug.training.numerics.profile import record
from nnunet_varaug.training.numerics.rounder import Rounder
from nnunet_varaug.training.numerics.rounding import HIGH, PRECISION, PrecisionError, check_virtual_bits
from nnunet_varaug.training.numerics.routes import SPECIAL

GRANULARITIES = ("op", "instruction")
DIRECTIONS = (None, "up", "down")


class MonteCarloArithmetic(TorchDispatchMode):
    """Stochastically round every floating-point aten result (module docstring) while active.

    Example::

        mca = MonteCarloArithmetic(virtual_bits=24, stream=3, granularity="op")
        with mca:                    # each entry is one iteration of the noise counter
            loss = model(x).sum()
            loss.backward()          # backward ops run under the mode too
            optimizer.step()

    Args:
        virtual_bits: t; None means each dtype's own precision (24 for float32, 11 for float16, 8 for
            bfloat16): stochastic rounding. t below it is Verificarlo's random rounding ``rr`` at t bits.
        stream: noise stream index (0 <= stream < 2^31); equal streams give bitwise-equal noise, different
            streams noise from different Philox keys.
        seed: keys the noise instead of ``stream`` (0 <= seed < 2^31); kept by :meth:`reseed`.
        granularity: ``"op"`` or ``"instruction"`` (module docstring).
        directed: testing aid: ``"up"`` or ``"down"`` replaces the random words by all ones or zeros, so that
            stochastic rounding rounds every inexact result away from zero or towards zero.
    """

    def __init__(self, virtual_bits: Optional[int] = None, stream: int = 0, seed: Optional[int] = None,
                 granularity: str = "op", directed: Optional[str] = None):
        super().__init__()
        if virtual_bits is not None:
            virtual_bits = int(virtual_bits)
            if not 1 <= virtual_bits <= PRECISION[torch.float32]:
                raise PrecisionError(f"virtual precision t={virtual_bits} must be in 1..24 (float32 at most)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        if directed not in DIRECTIONS:
            raise ValueError(f"directed must be one of {DIRECTIONS}, not {directed!r}")
        self.virtual_bits = virtual_bits
        self.stream = int(stream)
        self.seed = None if seed is None else int(seed)
        self.granularity = granularity
        noise = CounterNoise(noise_identity(self.stream, self.seed)) if directed is None \
            else DirectedNoise(directed == "up")
        self.rounder = Rounder(noise, virtual_bits)
        self.perturbed_ops = 0
        self.route: Optional[str] = None  # the route the last rounded op took (for the profile)
        #: None, or a dict that collects per aten op: calls, seconds, values rounded, route, and the additions an
        #: op rounded only once (set it to {} to profile; :func:`.profile.summary` reads it)
        self.profile: Optional[Dict[str, Dict[str, Any]]] = None

    def __repr__(self) -> str:
        bits = "dtype precision" if self.virtual_bits is None else self.virtual_bits
        seed = "" if self.seed is None else f", seed={self.seed}"
        return (f"MonteCarloArithmetic(virtual_bits={bits}, stream={self.stream}{seed}, "
                f"granularity={self.granularity!r})")

    @property
    def perturbed_elements(self) -> int:
        """How many values were rounded (results at op level, instructions at instruction level)."""
        return self.rounder.elements

    @property
    def generator(self) -> Dict[str, object]:
        """The noise generator's record (name, version, key and counter layout)."""
        return dict(GENERATOR)

    # ---- noise ---------------------------------------------------------------------------------------------
    def reseed(self, epoch: int) -> None:
        """Key the noise with ``epoch`` (and the stream or seed) and restart its counters."""
        self.rounder.noise.reseed(int(epoch))

    def __enter__(self):
        self.rounder.noise.begin_iteration()
        return super().__enter__()

    def round(self, high: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Round the high-precision result ``high`` to ``dtype`` with this mode's noise (a new op)."""
        check_virtual_bits(self.virtual_bits, dtype)
        self.rounder.begin_op()
        return self.rounder.round(high, dtype)

    # ---- dispatch ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.profile is None:
            return self._dispatch(func, args, kwargs or {})
        return record(self, func, args, kwargs or {})

    def _dispatch(self, func, args, kwargs):
        plan = plan_for(func)
        if not plan.perturb or (plan.condition is not None and not plan.condition(args, kwargs)):
            return func(*args, **kwargs)
        outputs = dt.output_dtypes(func, args, kwargs)
        working = dt.floating_outputs(outputs + dt.written_dtypes(plan.writes, args, kwargs))
        if not working:
            return func(*args, **kwargs)
        low = max(working, key=lambda d: PRECISION[d])  # mixed outputs: computed for the widest
        if self.virtual_bits is not None:
            for d in set(working):
                check_virtual_bits(self.virtual_bits, d)
        self.perturbed_ops += 1
        self.rounder.begin_op()
        self.route = "generic"
        fused = FUSED.get(func)
        if fused is not None:
            result = fused(self.rounder, *args, **kwargs)
            if result is not NotImplemented:
                self.route = "fused"
                return result
        special = SPECIAL.get((self.granularity, func))
        if special is not None:
            with single_thread():
                result = special(self.rounder, *args, **kwargs)
            if result is not NotImplemented:
                self.route = self.granularity
                return result
        return self._generic(func, low, outputs, args, kwargs)

    def _generic(self, func, low: torch.dtype, outputs, args, kwargs):
        high = HIGH[low]
        pointwise = dt.is_pointwise(func)
        originals: Dict[int, torch.Tensor] = {}

        def up(v: Any) -> Any:
            h = dt.widen(v, high, low, pointwise)
            if isinstance(v, torch.Tensor) and h is not v:
                originals[id(h)] = v
            return h

        hargs = tree_map(up, args)
        hkwargs = tree_map(up, kwargs)
        if isinstance(kwargs.get("dtype"), torch.dtype):
            hkwargs["dtype"] = high
        if pointwise:
            out = func(*hargs, **hkwargs)
        else:
            with single_thread():  # float64 reductions in one order, whatever the thread count
                out = func(*hargs, **hkwargs)
        for position, name in plan_for(func).writes:
            value = hargs[position] if position < len(hargs) else hkwargs.get(name)
            for h in (value if isinstance(value, (list, tuple)) else (value,)):
                original = originals.get(id(h)) if isinstance(h, torch.Tensor) else None
                if original is not None:
                    if original.shape != h.shape:  # an out= tensor the op resized
                        original.resize_(h.shape)
                    original.copy_(self._down(h, original.dtype))
        flat, spec = tree_flatten(out)
        results = []
        for i, r in enumerate(flat):
            if isinstance(r, torch.Tensor) and id(r) in originals:  # an in-place op returning its argument
                results.append(originals[id(r)])
            elif isinstance(r, torch.Tensor):
                want = outputs[i] if i < len(outputs) and outputs[i] is not None else low
                results.append(self._down(r, want))
            else:
                results.append(r)
        return tree_unflatten(results, spec)

    def _down(self, r: torch.Tensor, want: torch.dtype) -> torch.Tensor:
        """A high-precision result as the dtype PyTorch gives it, stochastically rounded when it is perturbed."""
        if want in HIGH and r.dtype == HIGH[want]:
            return self.rounder.round(r, want)
        if want in HIGH and r.dtype in HIGH.values() and r.dtype != HIGH[want]:
            return self.rounder.round(r.to(HIGH[want]), want)  # mixed-precision op: a documented double rounding
        return r if r.dtype == want else r.to(want)
