"""Runs of one sweep that share a device, advance in lockstep and agree on one length.

When every run of a sweep trains at once on one GPU, a cheap model gets through its steps faster than a dear one,
and runs fitted to a time limit one by one (``train.TimeLimitFit``) end with different step counts.  In a
lockstep group each run, after each step, waits while it is more than ``lag`` steps ahead of the slowest run
still going.  The device time a cheap run leaves goes to the others, and every run times the same pace.  A
time-limited run fits its length at the same step as the others, then :meth:`LockstepMember.agree` gives every
run of the group the smallest of their fitted lengths.  The runs fit before their warm-up ends (warmup_steps >=
``train.FIT_AT_STEP``), so the agreed length changes no learning rate already used.

A run leaves the group when it ends (:meth:`LockstepMember.finish`: planned end, early stop, deadline, failure).
A run that gave no sign of life for ``stall_s`` seconds (its process died, or never started) is no longer
waited for.  Waiting never touches the device: the group lives in shared memory made before the workers start.
"""

from __future__ import annotations

import multiprocessing
import time

LAG_STEPS = 5  # a run waits while it is more than this many steps ahead of the slowest live run
STALL_S = 120.0  # a run silent for this long (no step, no wait) is no longer waited for
POLL_S = 0.005  # how often a waiting run looks again

_NOT_STARTED = -1
_WILL_NOT_FIT = -1  # a proposal: this run has no length to propose (no time limit, or fitted before a resume)


class Lockstep:
    """The shared state of a group of ``size`` runs, one slot each.

    Made by the sweep before its worker processes start and handed to them (``ctx``: their multiprocessing
    context); each run holds :meth:`member` of its slot.
    """

    def __init__(self, size: int, ctx=None, lag: int = LAG_STEPS, stall_s: float = STALL_S,
                 poll_s: float = POLL_S):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a lockstep group needs size >= 1 runs, got {size!r}")
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"lag must be an int >= 0 steps, got {lag!r}")
        if not stall_s > 0 or not poll_s > 0:
            raise ValueError(f"stall_s and poll_s must be > 0 seconds, got {stall_s!r} and {poll_s!r}")
        ctx = ctx or multiprocessing.get_context()
        self.size, self.lag, self.stall_s, self.poll_s = size, lag, float(stall_s), float(poll_s)
        self.steps = ctx.RawArray("q", [_NOT_STARTED] * size)  # steps done by each run
        self.beats = ctx.RawArray("d", [time.time()] * size)  # time.time() of each run's last sign of life
        self.ended = ctx.RawArray("b", size)
        self.proposals = ctx.RawArray("q", size)  # fitted length posted; 0: none yet; -1: will post none
        self.agreed = ctx.Value("q", 0)  # the agreed length, once decided (0 before); its lock guards the decision

    def member(self, slot: int) -> "LockstepMember":
        if not 0 <= slot < self.size:
            raise ValueError(f"slot must be in [0, {self.size}), got {slot!r}")
        return LockstepMember(self, slot)

    def live(self, slot: int, now: float) -> bool:
        """Whether the run of ``slot`` is still waited for: not ended and heard from within stall_s."""
        return not self.ended[slot] and now - self.beats[slot] <= self.stall_s

    def slowest(self, now: float) -> int:
        """The fewest steps done by a live run (-1 while one has not started)."""
        live = [self.steps[i] for i in range(self.size) if self.live(i, now)]
        return min(live) if live else 0


class LockstepMember:
    """One run's handle on its group: start, after every step, agree on the length once, finish."""

    def __init__(self, group: Lockstep, slot: int):
        self.group, self.slot = group, slot

    @property
    def size(self) -> int:
        return self.group.size

    def _beat(self) -> None:
        self.group.beats[self.slot] = time.time()

    def start(self, step: int, will_fit: bool) -> None:
        """The run starts training at ``step`` (0, or where it resumed); ``will_fit``: it will call
        :meth:`agree` once (a time-limited run that has not fitted its length yet)."""
        group = self.group
        group.ended[self.slot] = 0
        group.proposals[self.slot] = 0 if will_fit else _WILL_NOT_FIT
        group.steps[self.slot] = step
        self._beat()

    def after_step(self, step: int) -> None:
        """Record ``step`` steps done, then wait while this run is more than ``lag`` steps ahead of the slowest
        live run of the group."""
        group = self.group
        group.steps[self.slot] = step
        self._beat()
        while step - group.slowest(time.time()) > group.lag:
            time.sleep(group.poll_s)
            self._beat()

    def agree(self, fitted: int) -> int:
        """Post this run's fitted length and return the group's: the smallest length posted, once every live
        run that will fit has posted.  A run posting after the decision (it was stalled) gets the smaller of
        the decision and its own."""
        group = self.group
        group.proposals[self.slot] = int(fitted)
        while True:
            with group.agreed.get_lock():
                if group.agreed.value > 0:
                    return min(group.agreed.value, int(fitted))
                now = time.time()
                if not any(group.proposals[i] == 0 and group.live(i, now) for i in range(group.size)):
                    group.agreed.value = min(p for p in group.proposals if p > 0)
                    return group.agreed.value
            time.sleep(group.poll_s)
            self._beat()

    def finish(self) -> None:
        """The run ended (for any reason): nobody waits for it any more."""
        self.group.ended[self.slot] = 1
