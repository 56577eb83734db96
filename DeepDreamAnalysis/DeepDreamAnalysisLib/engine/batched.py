"""Several dreams of one network as ONE batch through it (batched restarts, docs/studies.md).

The members are ordinary :class:`~..dream.DreamLoop` s of the same network and crop size (restarts,
seed points of the same crop size, even different methods): each keeps its own start image, seed,
method, random generators, objective and update. At every iteration the members' network inputs
(``[K_m, C, ...]`` each, ``K_m`` the member's transformed copies, 1 for ``paper``) are concatenated
into one batch ``[sum K_m, C, ...]`` for one forward and one backward; each member's objective is
read from its own rows, and since the network treats the rows of a batch independently (eval mode),
the gradient of the sum of the objectives with respect to one member's image is that member's own
gradient. Members whose transformed copies run on an exact seed window (:mod:`..dreaming.window`)
send their copies' windows (one forward per window size, usually one) and their full crops together
in one forward without gradient, for the probability maps. The results equal separate runs up to floating-point rounding (batched convolutions may
sum in another order): tested in Testing/test_batched.py.

A member that stops early, faults (a non-finite gradient) or reaches its last iteration leaves the
batch; the others go on. :func:`batchable` checks once, with a probe forward, that the network
gives each row of a batch the output it gives that row alone (a TorchScript model traced with a
batch of one, or a model that mixes the rows of a batch, does not): otherwise the caller runs the
members separately.
"""

from __future__ import annotations

import contextlib
import math
import queue
from dataclasses import dataclass
from typing import Iterator

import torch

from ..dream import model_fault
from ..dreaming.convolutions import batch_voxels, convolutions_for
from ..dreaming.method import update_together
from ..dreaming.transforms import copies_together
from ..dreaming.redirect import redirected_relus
from ..dreaming.window import WindowMismatch
from ..errors import ModelError, RunFault, SeedError
from ..seed_outputs import SeedMaps, masks_near_seed, same_seed_outputs, windowed_objectives


@dataclass
class MemberEvent:
    """What happened to member ``index`` at one iteration: a ``state`` (a
    :class:`~..dream.DreamState`), or ``error`` (a :class:`RunFault` or :class:`SeedError`) that ended
    that member's dream (its earlier states stay valid)."""

    index: int
    state: object = None
    error: Exception | None = None


def member_input(loop, x: torch.Tensor) -> torch.Tensor:
    """The network input of one member for image ``x`` [k, j, i]: ``[K, C=1, ...]`` (``K`` copies)."""
    if loop.method.is_paper:
        return loop._network_input(x)
    return loop._batch_input(loop.method.batch(x))


def copy_groups(loops: list) -> list:
    """How :func:`windowed_inputs` makes the members' copies: per window, ``(window, alike, alone)``:
    the positions of the members sampled together (the same window, the same kind of copies and the
    same preprocessing; at least two) and of the others of that window, each sampled on its own.
    It depends only on the members' settings, so a batch computes it once per set of members."""
    groups: dict = {}
    for pos, loop in enumerate(loops):
        if loop.window is not None:
            groups.setdefault(loop.window, []).append(pos)
    plan = []
    for window, positions in groups.items():
        first = loops[positions[0]]
        alike = [p for p in positions if loops[p].method.transforms is not None and first.method.transforms is not None
                 and first.method.transforms.same_copies(loops[p].method.transforms)
                 and loops[p].card.preprocessing == first.card.preprocessing]
        if len(alike) < 2:
            alike = []
        plan.append((window, tuple(alike), tuple(p for p in positions if p not in alike)))
    return plan


def windowed_inputs(loops: list, xs: list, wholes: dict | None = None, stacked: torch.Tensor | None = None,
                    groups: list | None = None) -> list:
    """The network inputs ``[K, C=1, *window]`` of the members whose copies run on a seed window, the
    members with the same window and the same kind of copies sampled together
    (:func:`~..dreaming.transforms.copies_together`: each with its own random draws); None for the others.
    ``wholes``: filled with ``{positions: their inputs as one batch}`` for the members sampled together
    (the batch the network gets, without concatenating their rows again). ``stacked``: the images
    ``xs`` as one tensor ``[N, k, j, i]`` (``xs`` its rows), used as is where all members are sampled
    together; ``groups``: :func:`copy_groups` of ``loops`` when already known."""
    out: list = [None] * len(loops)
    for window, alike, alone in (copy_groups(loops) if groups is None else groups):
        for p in alone:
            out[p] = loops[p].window_input(xs[p])
        if not alike:
            continue
        first = loops[alike[0]]
        images = stacked if stacked is not None and alike == tuple(range(len(loops))) else [xs[p] for p in alike]
        copies = copies_together([loops[p].method.transforms for p in alike], images, window)
        batch = first._batch_input(copies)
        k = first.method.copies
        for row, p in enumerate(alike):
            out[p] = batch[row * k:(row + 1) * k]
        if wholes is not None:
            wholes[alike] = batch
    return out


def batchable(network, inputs: list[torch.Tensor], rtol: float = 1e-3, atol: float = 1e-4) -> tuple[bool, str]:
    """(True, "") when ``network`` takes a batch of the first rows of ``inputs`` (network inputs
    ``[1, C, ...]``) and gives each row the output it gives that row alone; else (False, why).

    One probe forward of a batch of two rows and one of a single row, without gradients.
    """
    rows = [t[:1] for t in inputs[:2]]
    if len(rows) < 2:
        rows = rows * 2
    try:
        with torch.no_grad():
            both = network(torch.cat(rows, dim=0))
            alone = network(rows[1])
    except Exception as exc:  # noqa: BLE001 - a model that cannot take a batch
        return False, f"the network raised {type(exc).__name__} on a batch of two ({str(exc).splitlines()[0][:200] if str(exc) else ''})"
    if not isinstance(both, torch.Tensor) or not isinstance(alone, torch.Tensor):
        return False, "the network does not return a tensor"
    if both.shape[0] != 2 or tuple(both.shape[1:]) != tuple(alone.shape[1:]):
        return False, (f"for a batch of two inputs the network returned shape {list(both.shape)} (one row alone: "
                       f"{list(alone.shape)}): it was probably traced or scripted with a fixed batch of one")
    scale = float(alone.abs().max()) or 1.0
    if not torch.allclose(both[1], alone[0], rtol=rtol, atol=atol * scale):
        return False, ("the network's output for one row depends on the other rows of the batch (batch statistics, "
                       "e.g. BatchNorm in training mode, or a model that mixes the batch)")
    return True, ""


def member_checks(objectives: list, grads: torch.Tensor) -> tuple[list, list, list]:
    """The members' objective values (floats), whether each gradient (a row of ``grads``
    ``[N, ...]``) is finite, and whether each is non-zero anywhere: each row's largest absolute value
    (NaN or infinite when the row holds one) and the objectives in one copy to Python for all members."""
    with torch.no_grad():  # in float64: a half-precision model's values are not rounded to inf or 0
        values = torch.stack([o.detach().reshape(()) for o in objectives]).double()
        largest = grads.detach().flatten(1).abs().amax(dim=1).double()
        table = torch.cat([values, largest]).tolist()
    n = len(objectives)
    values, largest = table[:n], table[n:]
    return values, [math.isfinite(v) for v in largest], [v > 0 for v in largest]


class BatchedDreamLoop:
    """Run the members (``DreamLoop`` s of one network and crop size) together, one forward per iteration.

    Iterating yields, per iteration, the list of :class:`MemberEvent` of the members still running
    (in member order). :meth:`retire` takes a member out (e.g. cancelled by the caller).
    ``stopped_early[m]`` is True when member ``m`` stopped on the probability rule.
    """

    def __init__(self, loops: list):
        if not loops:
            raise ValueError("BatchedDreamLoop needs at least one member")
        first = loops[0]
        for loop in loops[1:]:
            if loop.network is not first.network or tuple(loop.x0.shape) != tuple(first.x0.shape):
                raise ValueError("the members of a batch must share the network and the crop size")
        self.loops = list(loops)
        self.network = first.network
        self.stopped_early = [False] * len(loops)
        self._retired: set[int] = set()
        self._gradient_voxels = 0
        self._plans: dict = {}
        # every method but paper picks the CPU convolution kernels by batch size (dreaming/convolutions.py)
        self._pick_kernels = not all(loop.method.is_paper for loop in loops)
        relus = [getattr(loop, "_relus", []) for loop in loops]
        # redirected ReLU gradients act per batch item, so a batch of non-paper members gets each member's own
        self._redirect = (relus[0], first.redirects) if all(relus) else ([], None)

    def retire(self, index: int) -> None:
        """Take member ``index`` out of the batch from the next iteration on."""
        self._retired.add(int(index))

    def _plan(self, loops: list) -> tuple[list, list]:
        """How the members ``loops`` (the active ones, in order) are batched: their :func:`copy_groups`,
        and the windowed members whose outputs are read together (:func:`same_seed_outputs`), as lists
        of positions. Computed once per set of members and windows, not at every iteration."""
        key = tuple((id(loop), id(loop.window)) for loop in loops)
        plan = self._plans.get(key)
        if plan is None:
            readers: list[list[int]] = []
            for pos, loop in enumerate(loops):
                if loop.window is None:
                    continue
                group = next((g for g in readers if same_seed_outputs(loops[g[0]], loop)), None)
                if group is None:
                    readers.append([pos])
                else:
                    group.append(pos)
            plan = self._plans[key] = (copy_groups(loops), readers)
        return plan

    def _forward(self, loops: list, xs: list, stacked: torch.Tensor | None = None) -> list:
        """(objective, probability map) of each member: the members' network inputs with gradient
        (their copies, or their copies' windows, :mod:`..dreaming.window`) in one forward per input
        size (one, unless the windows differ), and the full crops of the windowed members in one
        forward without gradient. ``stacked``: the images ``xs`` as one tensor (``xs`` its rows)."""
        groups, readers = self._plan(loops)
        wholes: dict = {}
        inputs = windowed_inputs(loops, xs, wholes, stacked, groups)
        inputs = [inp if inp is not None else member_input(loop, x) for inp, loop, x in zip(inputs, loops, xs)]
        sizes: dict[tuple, list[int]] = {}
        for pos, inp in enumerate(inputs):
            sizes.setdefault(tuple(inp.shape[1:]), []).append(pos)
        rows: list = [None] * len(inputs)
        together: dict[tuple, torch.Tensor] = {}  # a size's positions -> their logits, one tensor
        self._gradient_voxels = sum(batch_voxels(inp) for inp in inputs)
        with redirected_relus(*self._redirect):  # as each member's own forward (not paper)
            for positions in sizes.values():
                batch = wholes.get(tuple(positions))
                if batch is None:
                    batch = torch.cat([inputs[p] for p in positions], dim=0)
                with self._kernels(batch_voxels(batch)):
                    logits = self.network(batch)
                if not isinstance(logits, torch.Tensor) or logits.shape[0] != batch.shape[0]:
                    raise ModelError(f"For a batch of {batch.shape[0]} inputs the network returned "
                                     f"{getattr(logits, 'shape', [None])[0]} outputs: it cannot run a batch.")
                together[tuple(positions)] = logits
                row = 0
                for p in positions:
                    n = inputs[p].shape[0]
                    rows[p] = logits[row:row + n]
                    row += n
        outputs: list = [None] * len(loops)
        for pos, loop in enumerate(loops):
            if loop.window is None:
                outputs[pos] = loop._objective_and_probability(rows[pos])
        near = []
        for group in readers:
            logits = together.get(tuple(group))
            if logits is None:
                logits = torch.cat([rows[p] for p in group], dim=0)
            results = windowed_objectives([loops[p] for p in group], logits, [xs[p] for p in group],
                                          self._run_without_gradient)
            for pos, result in zip(group, results):
                if isinstance(result, WindowMismatch):  # this member's copies on the full crop from now on
                    loops[pos].drop_window(str(result))
                    outputs[pos] = loops[pos].full_copies_forward(xs[pos], loops[pos].method.transforms.last)
                    continue
                outputs[pos] = result
                near.append(pos)
        if near:  # the windowed members' masks, near their seeds: their boxes of one size in one forward
            near.sort()
            masks_near_seed([loops[p] for p in near], [xs[p] for p in near], [outputs[p][1] for p in near],
                            self._run_without_gradient)
        return outputs

    def _run_without_gradient(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._kernels(batch_voxels(batch), gradient=False):
            return self.network(batch)

    def _kernels(self, voxels: int, gradient: bool = True):
        """The CPU convolution kernels for a batch of ``voxels`` voxels (all paper: torch's choice)."""
        if not self._pick_kernels:
            return contextlib.nullcontext()
        first = self.loops[0]
        return convolutions_for(first.device, first.card.spatial_dims, voxels, gradient)

    def __iter__(self) -> Iterator[list[MemberEvent]]:
        loops = self.loops
        xs = [loop.initial_image() for loop in loops]
        above = [0] * len(loops)
        iterations = [loop.config.iterations for loop in loops]
        it = 0
        while True:
            active = [m for m in range(len(loops)) if m not in self._retired and it < iterations[m]]
            if not active:
                return
            events: list[MemberEvent] = []
            members = [loops[m] for m in active]
            try:
                for loop in members:
                    loop._iteration = it
                # the members' images as the rows of ONE leaf: one gradient tensor [N, k, j, i] comes back
                stacked = torch.stack([xs[m] for m in active]).requires_grad_(True)
                rows = stacked.unbind(0)
                outputs = self._forward(members, list(rows), stacked)
                total = 0
                for loop, row, (objective, _) in zip(members, rows, outputs):
                    total = total + loop._regularised(objective, row)
                with self._kernels(self._gradient_voxels):
                    (grads,) = torch.autograd.grad(total, stacked)
            except (ModelError, RunFault):
                raise
            except torch.cuda.OutOfMemoryError:
                raise RunFault(
                    f"Out of GPU memory at iteration {it} with {len(active)} dreams in one batch. Run them separately "
                    "(batch_restarts off), use a smaller crop (roi_size) or run on the CPU (--device cpu).") from None
            except Exception as exc:  # an exception inside the user's model
                first = loops[active[0]]
                raise model_fault(exc, it, first.card, first.x0.shape) from exc
            images = stacked.detach()
            going_on = []
            obj_values, finite, moving = member_checks([objective for objective, _ in outputs], grads)
            for pos, (m, (_, prob)) in enumerate(zip(active, outputs)):
                loop = loops[m]
                x = images[pos]
                maps = SeedMaps.of(prob, loop.seed)
                p_seed = maps.p_seed
                if not (math.isfinite(obj_values[pos]) and finite[pos]):
                    events.append(MemberEvent(m, error=RunFault(
                        f"The gradient became NaN or infinite at iteration {it}; the result keeps the iterations "
                        "before it. Try a smaller step or --normalize-gradient.")))
                    self._retired.add(m)
                    continue
                if it == 0 and not moving[pos]:
                    events.append(MemberEvent(m, error=SeedError(
                        "The network's output at the seed does not depend on the image (its gradient is zero at the "
                        "start): the seed lies where the model cannot see, or the model is saturated there. Pick a "
                        "seed inside the region the model segments (for example inside the organ), or try --start "
                        "noise.")))
                    self._retired.add(m)
                    continue
                events.append(MemberEvent(m, state=loop.state(it, obj_values[pos], x, maps)))
                cfg = loop.config
                if cfg.stop_probability is not None:
                    above[m] = above[m] + 1 if p_seed > cfg.stop_probability else 0
                    if above[m] >= cfg.stop_patience:
                        self.stopped_early[m] = True
                        loop.stopped_early = True
                        self._retired.add(m)
                        continue
                going_on.append(pos)
            if going_on:  # the members' next images, in one stacked update where their methods allow
                if len(going_on) < len(active):
                    index = torch.tensor(going_on, device=images.device)
                    images, grads = images.index_select(0, index), grads.index_select(0, index)
                nexts = update_together([members[pos].method for pos in going_on], images, grads)
                for pos, x in zip(going_on, nexts):
                    xs[active[pos]] = x
            yield events
            it += 1


# ----------------------------------------------------------------------------- whole analyses, batched

_END, _SOLO = object(), object()


class _MemberLoop:
    """What one member's ``run_analysis`` iterates instead of its DreamLoop: the states the
    coordinator hands it (or, told to run alone, the DreamLoop itself). Everything else is the
    DreamLoop's (``update_region``, ``network``, ``stopped_early``...)."""

    def __init__(self, loop, index: int, hub: "queue.Queue"):
        self._loop, self._index, self._hub = loop, index, hub
        self._inbox: queue.Queue = queue.Queue()

    def __getattr__(self, name):
        return getattr(self._loop, name)

    def __iter__(self):
        self._hub.put(("ready", self._index, self._loop))
        while True:
            item = self._inbox.get()
            if item is _END:
                return
            if item is _SOLO:
                yield from self._loop
                return
            if item.error is not None:
                raise item.error
            yield item.state
            self._hub.put(("next", self._index, None))


def run_together(jobs: list, check=batchable) -> list:
    """Run the analyses ``jobs`` with their dream loops batched; returns, per job, what it returned
    or the exception it raised (in job order).

    Each job is a callable ``job(loop_factory)`` that runs :func:`~..analysis.run_analysis` with that
    ``loop_factory``. The jobs run on their own threads, strictly one at a time (each waits while
    another works), so their feature computation, progress reports and quality checks are exactly
    those of a separate run; this thread forwards the batch. The members whose crops have the same
    shape, on a network that :func:`batchable` accepts, form one batch; the others run alone, with
    ``metadata["batch"]["note"]`` saying why.
    """
    import threading

    hub: queue.Queue = queue.Queue()
    members: dict[int, _MemberLoop] = {}
    outcomes: list = [None] * len(jobs)
    finished: set[int] = set()

    def factory_for(index):
        def make(*args, **kwargs):
            from ..dream import DreamLoop

            member = members[index] = _MemberLoop(DreamLoop(*args, **kwargs), index, hub)
            return member
        return make

    def work(index, job):
        try:
            outcomes[index] = job(factory_for(index))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            outcomes[index] = exc
        hub.put(("done", index, None))

    def wait_for(index):
        """Block until member ``index`` asks for its next state (True) or has finished (False)."""
        kind, who, loop = hub.get()
        assert who == index, (kind, who, index)
        if kind == "done":
            finished.add(index)
            return False
        return True

    ready: dict[int, object] = {}
    for index, job in enumerate(jobs):  # set-ups one after the other: each stops at its first state
        threading.Thread(target=work, args=(index, job), daemon=True, name=f"dream-member-{index}").start()
        kind, who, loop = hub.get()
        if kind == "ready":
            ready[index] = loop
        else:
            finished.add(index)
    notes: dict[int, dict] = {}
    groups: dict[tuple, list[int]] = {}
    for index, loop in ready.items():
        groups.setdefault((tuple(loop.x0.shape), str(loop.device)), []).append(index)
    for group in groups.values():
        loops = [ready[i] for i in group]
        ok, why = (True, "") if len(group) < 2 else check(loops[0].network, [lp._network_input(lp.x0) for lp in loops])
        if len(group) < 2 or not ok:
            for i in group:
                notes[i] = {"batched": False, "size": 1, "note": f"run separately: {why}" if why else
                            "run separately: no other dream of the same crop size to batch with"}
                members[i]._inbox.put(_SOLO)
                while wait_for(i):
                    pass
            continue
        _drive(BatchedDreamLoop(loops), group, members, wait_for, finished)
        for i in group:
            notes[i] = {"batched": True, "size": len(group)}
    for index in range(len(jobs)):
        result = outcomes[index]
        if index in notes and hasattr(result, "metadata"):
            result.metadata["batch"] = notes[index]
    return outcomes


@dataclass
class BatchMember:
    """One analysis of a batch: its start image (a :class:`~..volume.Volume`), seed (i, j, k), its
    :class:`~..config.AnalysisConfig` and, optionally, its progress callback."""

    volume: object
    seed_ijk: tuple
    config: object
    on_progress: object = None


def run_batched(model, members: list[BatchMember], reference=None, cancel=None, batch: bool = True) -> list:
    """:func:`~..analysis.run_analysis` for every member, with the dreams of the same crop size run
    as one batch through ``model``'s network (``batch=False``: one after the other, as separate
    runs). Returns the :class:`~..result.AnalysisResult` s in member order; the first bad-input
    error of a member (what ``run_analysis`` would raise) is raised. Each result's
    ``metadata["batch"]`` says whether it ran batched, and with how many.
    """
    from ..analysis import run_analysis

    def job(member):
        return lambda factory: run_analysis(member.volume, member.seed_ijk, model, member.config, reference,
                                            on_progress=member.on_progress, cancel=cancel, loop_factory=factory)

    if not batch:
        outcomes = []
        for member in members:
            result = run_analysis(member.volume, member.seed_ijk, model, member.config, reference,
                                  on_progress=member.on_progress, cancel=cancel)
            result.metadata["batch"] = {"batched": False, "size": 1, "note": "batching turned off"}
            outcomes.append(result)
        return outcomes
    outcomes = run_together([job(m) for m in members])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def _drive(batch: BatchedDreamLoop, group: list[int], members: dict, wait_for, finished: set) -> None:
    """Hand each event of ``batch`` to its member and wait until that member has dealt with it."""
    position = {index: m for m, index in enumerate(group)}  # run index -> position in the batch
    try:
        for events in batch:
            for event in events:
                index = group[event.index]
                if index in finished:
                    batch.retire(event.index)
                    continue
                members[index]._inbox.put(event)
                if not wait_for(index):  # the analysis ended (cancelled, a fault, an error)
                    batch.retire(event.index)
    except Exception as exc:  # noqa: BLE001 - the batch's fault is every running member's fault
        for index in group:
            if index not in finished and position[index] not in batch._retired:
                members[index]._inbox.put(MemberEvent(position[index], error=exc))
                while wait_for(index):
                    members[index]._inbox.put(_END)
    for index in group:
        if index not in finished:
            members[index]._inbox.put(_END)
            while wait_for(index):
                members[index]._inbox.put(_END)


__all__ = ["BatchedDreamLoop", "MemberEvent", "batchable", "member_input", "run_together",
           "run_batched", "BatchMember"]
