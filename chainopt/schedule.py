"""When knots are tied: after every N optimizer steps, or after given step counts.

Example:
    >>> from chainopt.schedule import KnotSchedule
    >>> [s for s in range(1, 10) if KnotSchedule(knot_every=3).is_due(s)]
    [3, 6, 9]
    >>> [s for s in range(1, 10) if KnotSchedule(knots=[2, 7]).is_due(s)]
    [2, 7]
    >>> KnotSchedule.even(num_links=3, total_steps=300).knots
    (100, 200)
    >>> KnotSchedule.even(num_links=2, total_steps=50, steps_per_epoch=10).knots  # 5 epochs
    (20,)
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from ._validate import is_int as _is_int
from ._validate import not_python_number as _not_python

__all__ = ["KnotSchedule"]


class KnotSchedule:
    """A knot schedule over optimizer steps (counted from 1).

    Give exactly one of ``knot_every`` and ``knots``.

    Args:
        knot_every: tie a knot after steps N, 2N, 3N, …
        knots: tie a knot after each of these step counts (strictly increasing, positive).

    Raises:
        ValueError: both or neither given, a non-positive interval, or a knot list that is empty,
            non-positive, not strictly increasing or not made of ints.

    Example:
        >>> KnotSchedule(knot_every=4).is_due(8), KnotSchedule(knots=[3, 10]).is_due(8)
        (True, False)
        >>> KnotSchedule(knots=[10, 3])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: knots must be a non-empty, strictly increasing list ..., got [10, 3]
    """

    def __init__(self, knot_every: int | None = None, knots: Sequence[int] | None = None) -> None:
        if (knot_every is None) == (knots is None):
            raise ValueError(
                "give exactly one of knot_every and knots, got "
                f"knot_every={knot_every!r}, knots={knots!r}"
            )
        if knot_every is not None and (not _is_int(knot_every) or knot_every <= 0):
            raise ValueError(
                f"knot_every must be a positive int, got {knot_every!r}{_not_python(knot_every)}"
            )
        if knots is not None:
            ks = list(knots) if isinstance(knots, Sequence) and not isinstance(knots, str) else None
            if (
                not ks
                or not all(_is_int(k) for k in ks)
                or ks[0] <= 0
                or any(b <= a for a, b in pairwise(ks))
            ):
                raise ValueError(
                    f"knots must be a non-empty, strictly increasing list of positive ints, "
                    f"got {knots!r}{_not_python(ks or knots)}"
                )
            self.knots: tuple[int, ...] | None = tuple(ks)
            self._knot_set = frozenset(ks)
        else:
            self.knots = None
        self.knot_every = knot_every

    @classmethod
    def even(
        cls, num_links: int, total_steps: int, steps_per_epoch: int | None = None
    ) -> KnotSchedule:
        """Split ``total_steps`` into ``num_links`` links of (nearly) equal length.

        ``num_links - 1`` knots are tied inside the run; the last link is merged by
        ``merge_and_unload``. ``num_links=1`` is plain LoRA (no knot). With
        ``steps_per_epoch``, knots fall on epoch ends (links of whole epochs).

        Raises:
            ValueError: a non-positive argument, more links than steps (or epochs).
        """
        if not _is_int(num_links) or num_links <= 0:
            raise ValueError(
                f"num_links must be a positive int, got {num_links!r}{_not_python(num_links)}"
            )
        if not _is_int(total_steps) or total_steps < num_links:
            raise ValueError(
                f"total_steps must be an int >= num_links={num_links}, got {total_steps!r}"
                f"{_not_python(total_steps)}"
            )
        if steps_per_epoch is None:
            knots = [round(i * total_steps / num_links) for i in range(1, num_links)]
        else:
            if not _is_int(steps_per_epoch) or steps_per_epoch <= 0:
                raise ValueError(
                    f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}"
                    f"{_not_python(steps_per_epoch)}"
                )
            epochs = -(-total_steps // steps_per_epoch)
            if epochs < num_links:
                raise ValueError(
                    f"num_links={num_links} links of whole epochs need at least {num_links} "
                    f"epochs; total_steps={total_steps} with steps_per_epoch={steps_per_epoch} "
                    f"is {epochs}"
                )
            knots = [round(i * epochs / num_links) * steps_per_epoch for i in range(1, num_links)]
        return cls.from_steps(knots)

    @classmethod
    def from_steps(cls, knots: Sequence[int]) -> KnotSchedule:
        """Knots after exactly these steps; none at all for an empty list.

        Raises:
            ValueError: ``knots`` is not a list (or tuple, range) of strictly increasing positive
                ints.

        Example:
            >>> KnotSchedule.from_steps([]).is_due(5), KnotSchedule.from_steps([5]).is_due(5)
            (False, True)
        """
        ks = list(knots) if isinstance(knots, Sequence) and not isinstance(knots, str) else None
        if (
            ks is None
            or not all(_is_int(k) and k > 0 for k in ks)
            or any(b <= a for a, b in pairwise(ks))
        ):
            raise ValueError(
                f"knots must be a strictly increasing list of positive ints, got {knots!r}"
                f"{_not_python(knots)}"
            )
        knots = tuple(ks)
        schedule = cls.__new__(cls)
        schedule.knot_every, schedule.knots = None, tuple(knots)
        schedule._knot_set = frozenset(knots)
        return schedule

    def is_due(self, step: int) -> bool:
        """Whether a knot is due after optimizer step ``step`` (1-based)."""
        if self.knot_every is not None:
            return step % self.knot_every == 0
        return step in self._knot_set

    def __repr__(self) -> str:
        if self.knot_every is not None:
            return f"KnotSchedule(knot_every={self.knot_every})"
        return f"KnotSchedule(knots={list(self.knots or ())})"
