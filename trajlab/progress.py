"""Running estimates for long stages (capture over groups, JVPs, covariance): one formula, no state."""

from __future__ import annotations


def eta_line(done_cost: float, total_cost: float, elapsed_s: float, i: int, n: int) -> str:
    """``"[i/n], ~S s left"``: the time left at the rate so far per unit of cost (e.g. a group's samples x
    steps, what its run time scales with); ``"[i/n]"`` alone until a rate is known and once done."""
    if done_cost <= 0 or i >= n:
        return f"[{i}/{n}]"
    return f"[{i}/{n}], ~{elapsed_s / done_cost * (total_cost - done_cost):.0f} s left"


__all__ = ["eta_line"]
