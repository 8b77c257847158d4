"""Benchmark harness for optimizer steps: bandwidth floor, parameter lists, interleaved timing.

Package-free (torch and the standard library only). Used by ``benchmarks/step.py``; each piece
can be used alone:

* :func:`measure_inplace_bandwidth` - the in-place streaming bandwidth that defines the floor.
* :func:`gpt2_small_shapes`, :func:`sized_shapes`, :func:`resnet50_shapes` - parameter lists to step on.
* :class:`Contender` / :class:`Stepper` - a named way of building a step over a parameter list.
* :func:`run_workload` - builds every contender on its own copy of the parameters and measures the
  first call (compile), builds each again twice for timing (A B C C B A: where buffers land moves a
  step's time), interleaves the timed steps (order rotated every round), and then measures peak extra
  memory, state bytes and recompiles under a changing LR.

The floor of a step is ``bytes moved per parameter * parameters / bandwidth`` where the bandwidth
is that of an in-place pass (``x.mul_(c)``: reads and writes every element once) over a buffer that
moves the same number of bytes as the step, timed inside the same interleaved loop as the
contenders so that both see the same machine state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

try:
    import resource  # minor page faults (Unix)
except ImportError:  # Windows
    resource = None

import torch

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Machine and timing primitives
# --------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release_memory(device: torch.device) -> None:
    """Free what a failed contender left behind (its tensors, and on CUDA the allocator's cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# CPU features that change what a page's rows mean: bfloat16 matmul units (Newton-Schulz ran 10x faster
# with them on a Xeon of the same name) and 512-bit vectors
_CPU_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")


def machine_line(device: torch.device | str) -> str:
    """One line naming the machine: CPU model and the features in ``_CPU_FEATURES`` it has, cores, torch
    version, device. Two machines may report the same model name ("Intel(R) Xeon(R) Processor")."""
    dev = torch.device(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = flags = None
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and flags is None:
                    flags = set(line.split(":", 1)[1].split())
            if name:
                has = [feature for feature in _CPU_FEATURES if feature in (flags or ())]
                cpu = f"{name} ({', '.join(has) if has else 'no ' + '/'.join(_CPU_FEATURES)})"
    except OSError:
        pass
    cores = os.cpu_count()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    dev_s = "cpu"
    if dev.type == "cuda":
        dev_s = f"cuda ({torch.cuda.get_device_name(dev)})"
    return (
        f"CPU: {cpu}, {cores} cores{mem}, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; Python {platform.python_version()}; device: {dev_s}"
    )


def median_iqr(xs: Sequence[float]) -> tuple[float, float]:
    xs = sorted(xs)
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 4:
        return statistics.median(xs), (xs[-1] - xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[1], q[2] - q[0]


def minor_page_faults() -> int | None:
    """Pages this process has faulted in so far (Unix), or None where the OS does not say.

    A step that allocates its temporaries afresh pays for their pages every time (the kernel maps and
    zeroes them); a profiler books that to whichever kernel touches a page first, so it is counted here.
    """
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure_inplace_bandwidth(
    numel: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 15,
    warmup: int = 3,
) -> float:
    """Bytes/s of an in-place streaming pass ``x.mul_(c)`` over ``numel`` elements.

    Each pass reads and writes every element once: ``2 * numel * itemsize`` bytes. Median of
    ``repeats`` passes after ``warmup``. Size the buffer like the optimizer's working set (same
    bytes moved), so that cache effects at small sizes are the same for the floor and the step.
    """
    dev = torch.device(device)
    x = torch.randn(int(numel), device=dev, dtype=torch.float32).to(dtype)
    c = 1.0000001
    nbytes = 2 * x.numel() * x.element_size()
    times = []
    for i in range(warmup + repeats):
        t = _timed(lambda: x.mul_(c), dev)
        if i >= warmup:
            times.append(t)
    return nbytes / statistics.median(times)


# --------------------------------------------------------------------------------------------
# Parameter lists
# --------------------------------------------------------------------------------------------


def gpt2_small_shapes(scale: float = 1.0, n_layer: int = 12) -> list[tuple[str, Shape]]:
    """GPT-2 small's parameter list (HF layout, Conv1D weights are (in, out)): 148 tensors, 124.4M.

    ``scale`` < 1 shrinks the width (rounded to a multiple of 16), the vocabulary and the context
    by the same factor, keeping all 148 tensors (per-tensor overheads stay realistic) at about
    ``scale**2`` of the parameters: 0.25 gives ~7.8M.
    """
    if scale <= 0:
        raise ValueError("scale must be > 0")
    d = 768 if scale == 1.0 else max(16, int(round(768 * scale / 16)) * 16)
    vocab = 50257 if scale == 1.0 else max(64, int(round(50257 * scale)))
    ctx = 1024 if scale == 1.0 else max(16, int(round(1024 * scale)))
    shapes: list[tuple[str, Shape]] = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def resnet50_shapes() -> list[tuple[str, Shape]]:
    """ResNet-50's parameter list (torchvision layout): 161 tensors of 28 distinct shapes, 25.6M parameters.

    The many-shapes case: convolution kernels of every stage, batch-norm gains and biases of six widths.
    Specs with per-tensor or per-subset work compile one bucket per shape.
    """
    shapes: list[tuple[str, Shape]] = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            n = f"layer{stage}.{b}."
            for k, (out, cin, kernel) in enumerate([(planes, inplanes, 1), (planes, planes, 3), (4 * planes, planes, 1)], 1):
                shapes += [(f"{n}conv{k}.weight", (out, cin, kernel, kernel)), (f"{n}bn{k}.weight", (out,)), (f"{n}bn{k}.bias", (out,))]
            if b == 0:
                shapes += [(f"{n}downsample.0.weight", (4 * planes, inplanes, 1, 1)),
                           (f"{n}downsample.1.weight", (4 * planes,)), (f"{n}downsample.1.bias", (4 * planes,))]
            inplanes = 4 * planes
    return shapes + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def sized_shapes(total_numel: float, n_tensors: int = 100) -> list[tuple[str, Shape]]:
    """A transformer-like mix of matrices and vectors totalling about ``total_numel`` parameters.

    Blocks of 10 tensors (two norm gains, qkv matrix + bias, out matrix + bias, mlp up + bias,
    mlp down + bias; ~12 d^2 parameters each) plus one embedding matrix that absorbs the
    remainder so that the total is within a fraction of a percent of ``total_numel``.
    """
    total = int(total_numel)
    n_blocks = max(1, (n_tensors - 1) // 10)
    # 12 d^2 per block for ~85% of the total, the rest in the embedding.
    d = int(math.sqrt(0.85 * total / (12 * n_blocks)))
    d = max(8, (d // 8) * 8)
    shapes: list[tuple[str, Shape]] = []
    for i in range(n_blocks):
        b = f"blk.{i}."
        shapes += [
            (b + "norm1.weight", (d,)),
            (b + "qkv.weight", (3 * d, d)),
            (b + "qkv.bias", (3 * d,)),
            (b + "out.weight", (d, d)),
            (b + "out.bias", (d,)),
            (b + "norm2.weight", (d,)),
            (b + "up.weight", (4 * d, d)),
            (b + "up.bias", (4 * d,)),
            (b + "down.weight", (d, 4 * d)),
            (b + "down.bias", (d,)),
        ]
    used = sum(math.prod(s) for _, s in shapes)
    rows = max(1, (total - used) // d)
    shapes.insert(0, ("embed.weight", (rows, d)))
    while len(shapes) < n_tensors:  # pad with vectors if n_tensors is not 10k+1
        shapes.append((f"extra.{len(shapes)}.bias", (d,)))
    return shapes


def numel_of(shapes: Iterable[tuple[str, Shape]]) -> int:
    return sum(math.prod(s) for _, s in shapes)


def stepped_shapes(shapes: Sequence[tuple[str, Shape]], only_2d: bool) -> list[tuple[str, Shape]]:
    """The parameters a workload steps: all of them, or only the matrices (``only_2d``: matrix specs)."""
    return [(name, s) for name, s in shapes if not only_2d or len(s) == 2]


def make_params(
    shapes: Sequence[tuple[str, Shape]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Fresh parameters with random data and random ``.grad`` (same seed = same numbers)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-2).to(device=device, dtype=dtype)
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stepper:
    """What a contender builds over one parameter list.

    step:      the timed call (one optimizer step; must not reassign grads).
    optimizer: the torch.optim.Optimizer-like object (for state bytes), or None.
    set_lr:    set the learning rate as a user/scheduler would between steps (recompile check).
    refill:    called *untimed* before every step (for optimizers that clear ``p.grad``).
    numel:     parameters this stepper updates (defaults to the workload's).
    flops:     floating-point operations per step (matrix specs), for achieved FLOP/s.
    """

    step: Callable[[], Any]
    optimizer: Any = None
    set_lr: Callable[[float], None] | None = None
    refill: Callable[[], None] | None = None
    numel: int | None = None
    flops: float | None = None


@dataclasses.dataclass
class Contender:
    """A named way to step: ``make(params) -> Stepper`` (params carry their ``.grad``)."""

    name: str
    make: Callable[[list[torch.nn.Parameter]], Stepper]
    compiled: bool = False  # counts torch.compile recompiles for it
    family: str = "torch"  # "opdsl", "torch", "heavyball", "stream"
    note: str = ""


@dataclasses.dataclass
class Result:
    name: str
    family: str
    compiled: bool
    times: list[float] = dataclasses.field(default_factory=list)
    page_faults: list[int] = dataclasses.field(default_factory=list)  # minor page faults of each timed step
    first_call_s: float = float("nan")
    construct_s: float = float("nan")
    recompiles: int | None = None
    state_bytes: int = 0
    state_full_per_param: float = float("nan")
    numel: int = 0
    peak_extra_bytes: int | None = None
    kept_bytes: int | None = None
    flops: float | None = None
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return median_iqr(self.times)[0]

    @property
    def iqr(self) -> float:
        return median_iqr(self.times)[1]

    @property
    def state_bytes_per_param(self) -> float:
        return self.state_bytes / self.numel if self.numel else float("nan")


# --------------------------------------------------------------------------------------------
# State memory
# --------------------------------------------------------------------------------------------


def _walk_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if depth > 6:
        return
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_tensors(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_tensors(v, out, depth + 1)


def state_stats(optimizer: Any, params: Sequence[torch.Tensor]) -> tuple[int, float]:
    """(state bytes, full-size state tensors per parameter tensor) of an optimizer.

    Walks ``optimizer.state`` (nested dicts too, as HeavyBall keeps them); tensors are counted
    once (by address, size and dtype). Falls back to ``state_dict()['state']`` when ``.state``
    holds no tensors (an optimizer keeping flat buffers elsewhere must still checkpoint them). A
    state tensor is "full-size" when it has as many elements as its parameter (and > 1).
    """
    if optimizer is None:
        return 0, float("nan")
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    full = 0
    state = getattr(optimizer, "state", {}) or {}
    items: list[tuple[Any, list[torch.Tensor]]] = []
    for key, val in state.items():
        ts: list[torch.Tensor] = []
        _walk_tensors(val, ts)
        items.append((key, ts))
    if not any(ts for _, ts in items):
        try:
            sd = optimizer.state_dict().get("state", {})
        except Exception:  # noqa: BLE001 - best effort
            sd = {}
        items = []
        for key, val in sd.items():
            ts = []
            _walk_tensors(val, ts)
            items.append((key, ts))
    for key, ts in items:
        pn = key.numel() if torch.is_tensor(key) else None
        for t in ts:
            k = (t.data_ptr(), t.numel(), t.dtype)
            if k in seen:
                continue
            seen.add(k)
            total += t.numel() * t.element_size()
            if pn is not None and pn > 1 and t.numel() == pn:
                full += 1
    n = max(1, len(params))
    return total, (full / n if state else float("nan"))


# --------------------------------------------------------------------------------------------
# Peak extra memory of one steady-state step
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_fds():
    """Silence fds 1 and 2 (the profiler's C++ side prints start/stop lines there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def peak_extra_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[int | None, int | None, str]:
    """(peak bytes allocated above the level before ``fn``, bytes still held after, method).

    CUDA: ``torch.cuda.max_memory_allocated`` around the call. CPU: the profiler's memory events
    (every allocation through torch's CPU allocator, inductor-generated code included), summed in
    time order; tracemalloc does not see torch's allocations.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return (
            torch.cuda.max_memory_allocated(dev) - base,
            torch.cuda.memory_allocated(dev) - base,
            "cuda max_memory_allocated",
        )
    try:
        from torch.profiler import ProfilerActivity, profile

        with warnings.catch_warnings(), _quiet_fds():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        evs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        evs.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in evs:
            cur += e.nbytes()
            peak = max(peak, cur)
        return peak, cur, "CPU profiler memory events"
    except Exception as exc:  # noqa: BLE001
        fn()
        return None, None, f"n/a ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------
# Recompile counting
# --------------------------------------------------------------------------------------------


def dynamo_graph_count() -> int:
    """Graphs dynamo has compiled so far in this process (any function)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return 0
    return int(counters["stats"]["unique_graphs"])


def prepare_dynamo(limit: int = 64) -> None:
    """Raise dynamo's per-code-object recompile limit.

    Every torch optimizer in this process shares the same ``step`` code objects, so several
    compiled contenders and workloads would otherwise exhaust the default limit (8) and fall back
    to eager silently. Recompiles are counted explicitly, so a higher limit hides nothing.
    """
    try:
        import torch._dynamo.config as cfg

        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = max(cfg.recompile_limit, limit)
        if hasattr(cfg, "cache_size_limit"):
            cfg.cache_size_limit = max(cfg.cache_size_limit, limit)
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------
# The workload runner
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkloadReport:
    workload: str
    algo: str
    numel: int
    n_tensors: int
    bytes_per_param: float
    bytes_note: str
    bandwidth: float  # bytes/s, median of the interleaved in-place passes
    stream_times: list[float]
    results: list[Result]
    memory_method: str
    dtype: torch.dtype
    state_theory: tuple[float, str] | None = None  # (state bytes/param in theory, what it is)
    builds: int = 1  # timed builds of each contender (run_workload)

    @property
    def floor_s(self) -> float:
        return self.bytes_per_param * self.numel / self.bandwidth


def run_workload(
    workload: str,
    algo: str,
    shapes: Sequence[tuple[str, Shape]],
    contenders: Sequence[Contender],
    bytes_per_param: Callable[[list[Result]], tuple[float, str]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
    warmup: int = 3,
    recompile_steps: int = 100,
    only_2d: bool = False,
    builds: int = 2,
    log: Callable[[str], None] = print,
) -> WorkloadReport:
    """First calls, then timed builds, interleaved rounds, then memory and recompiles, for every contender.

    1. First calls: each contender is built on its own parameters and takes its first step (for a compiled
       one, the compile a user sees), then is dropped.
    2. Timed builds: each contender is built ``builds`` times, in the contenders' order and then reversed
       (A B C C B A), their first steps warm. Where a step's buffers were allocated moved its time: on the
       AMX Xeon the optimizer built first in a process, or first after a compile, stepped 5-20% slower
       than the same optimizer built later, for torch's fused AdamW as for opdsl. Step 1 keeps compiles
       out of this phase, a ballast of the workload's parameters (CPU) takes the first allocations, and
       the mirrored order evens out the rest. A second build that would not fit beside the first (free
       memory after the first below what this process took for it) is left out; ``WorkloadReport.builds``
       says.
    3. Rounds: every build and an in-place stream pass, the order rotated every round; a contender's time
       in a round is the mean of its builds'.
    4. Peak extra memory of one step, state bytes and recompiles over ``recompile_steps`` steps with a
       changing LR, on each contender's first build.

    ``bytes_per_param(results)`` gives the spec's own bytes moved per parameter (and a note on where the
    number came from) once every contender has taken its first step (state exists).
    """
    dev = torch.device(device)
    shapes = stepped_shapes(shapes, only_2d)
    prepare_dynamo()
    results = [Result(c.name, c.family, c.compiled, note=c.note, numel=numel_of(shapes)) for c in contenders]
    live = [(c, r) for c, r in zip(contenders, results) if _first_call(c, r, shapes, dev, dtype, workload, algo, log)]
    ballast = make_params(shapes, dev, dtype, seed=1) if dev.type == "cpu" else []
    instances = timed_builds(live, builds, shapes, dev, dtype, log)
    first_builds = list({id(r): (r, s, params) for r, (s, params) in reversed(instances)}.values())

    for r, s, params in first_builds:
        r.state_bytes, r.state_full_per_param = state_stats(s.optimizer, params)
    bpp, bpp_note = bytes_per_param(results)
    numel = max((r.numel for r in results if r.error is None), default=numel_of(shapes))
    itemsize = torch.empty((), dtype=dtype).element_size()
    # The stream moves the same bytes as the spec's step: 2 * n * itemsize == bpp * numel.
    stream_n = max(1024, int(bpp * numel / (2 * itemsize)))
    stream = torch.randn(stream_n, device=dev, dtype=torch.float32).to(dtype)
    stream_times = interleave(instances, lambda: stream.mul_(1.0000001), dev, repeats, warmup)
    bandwidth = 2 * stream_n * itemsize / statistics.median(stream_times)
    del stream, ballast

    method = "n/a"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r, s, _ in first_builds:
            if r.error is None:
                method = _memory_and_recompiles(r, s, dev, recompile_steps) or method
    for r in results:
        if r.error is None and not r.times:
            r.error = "no timings"
    builds_made = max((sum(1 for x, _ in instances if x is r) for r in results), default=0)
    instances.clear()
    first_builds.clear()
    gc.collect()
    return WorkloadReport(
        workload=workload,
        algo=algo,
        numel=numel,
        n_tensors=len(shapes),
        bytes_per_param=bpp,
        bytes_note=bpp_note,
        bandwidth=bandwidth,
        stream_times=stream_times,
        results=results,
        memory_method=method,
        dtype=dtype,
        builds=builds_made,
    )


def _first_call(
    c: Contender, r: Result, shapes: Sequence[tuple[str, Shape]], dev: torch.device, dtype: torch.dtype,
    workload: str, algo: str, log: Callable[[str], None],
) -> bool:
    """Build ``c`` on fresh parameters and time its first step into ``r`` (for compiled contenders, the
    compile); the build is dropped. False (with ``r.error``) where it fails."""
    try:
        # Inside the try: at 1e9 parameters on a GPU not every contender fits, and one that runs out of
        # memory is reported as such (keep fewer with --only).
        s, params, r.construct_s = _build(c, shapes, dev, dtype)
        if s.numel is not None:
            r.numel = s.numel
        r.flops = s.flops
        r.first_call_s = _first_step(s, dev)
        log(f"  [{workload}/{algo}] {c.name}: built {r.construct_s:.2f}s, first step {r.first_call_s:.2f}s")
        return True
    except Exception as exc:  # noqa: BLE001 - report and keep the others going
        r.error = f"{type(exc).__name__}: {exc}"[:300]
        log(f"  [{workload}/{algo}] {c.name}: FAILED {r.error}")
        return False
    finally:
        params = s = None  # noqa: F841 - unreferenced, so that release_memory frees them before the next build
        release_memory(dev)


def _build(
    c: Contender, shapes: Sequence[tuple[str, Shape]], dev: torch.device, dtype: torch.dtype,
) -> tuple[Stepper, list[torch.nn.Parameter], float]:
    """``c`` built on fresh parameters, refilled for its first step; with the seconds ``c.make`` took."""
    params = make_params(shapes, dev, dtype, seed=0)
    t0 = time.perf_counter()
    s = c.make(params)
    seconds = time.perf_counter() - t0
    if s.refill:
        s.refill()
    return s, params, seconds


def _first_step(s: Stepper, dev: torch.device) -> float:
    """Seconds of a build's first step (a compiled contender's compile, where it has not compiled yet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _timed(s.step, dev)


def _free_bytes(dev: torch.device) -> int | None:
    """Memory still free for allocations on ``dev`` (None where the OS does not say)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _used_bytes(dev: torch.device) -> int | None:
    """Memory this process holds on ``dev`` (CPU: resident set; CUDA: the caching allocator's reserve), None
    where the OS does not say. The machine-wide free memory moves with other processes; this does not."""
    if dev.type == "cuda":
        return torch.cuda.memory_reserved(dev)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def timed_builds(
    live: Sequence[tuple[Contender, Result]], builds: int, shapes: Sequence[tuple[str, Shape]],
    dev: torch.device, dtype: torch.dtype, log: Callable[[str], None],
) -> list[tuple[Result, tuple[Stepper, list[torch.nn.Parameter]]]]:
    """Each contender built ``builds`` times, forward then mirrored order, first step taken (warm)."""
    instances: list[tuple[Result, tuple[Stepper, list[torch.nn.Parameter]]]] = []
    for k in range(builds):
        used_before = _used_bytes(dev)
        for c, r in live if k % 2 == 0 else live[::-1]:
            if r.error is not None:
                continue
            try:
                s, params, _ = _build(c, shapes, dev, dtype)
                _first_step(s, dev)
                instances.append((r, (s, params)))
            except Exception as exc:  # noqa: BLE001 - a first build that fails is the contender's error
                params = s = None  # noqa: F841 - unreferenced, so that release_memory frees them
                release_memory(dev)
                if k == 0:
                    r.error = f"{type(exc).__name__}: {exc}"[:300]
                else:
                    log(f"  {r.name}: build {k + 1} left out ({type(exc).__name__}: {exc})"[:300])
        free, used = _free_bytes(dev), _used_bytes(dev)
        took = None if used is None or used_before is None else used - used_before
        if k + 1 < builds and free is not None and took is not None and free < took:
            log(f"  build {k + 2} left out: {free / 2**30:.1f} GiB free after build {k + 1}, which took {took / 2**30:.1f}")
            break
    return instances


def interleave(
    instances: Sequence[tuple[Result, tuple[Stepper, list[torch.nn.Parameter]]]], stream_step: Callable[[], Any] | None,
    dev: torch.device, repeats: int, warmup: int,
) -> list[float]:
    """Timed rounds over every build (and the stream, where given), the order rotated every round; each
    result's time in a round is the mean over its builds. Returns the stream's times."""
    stream_times: list[float] = []
    order: list[tuple[Result, Stepper] | None] = [(r, s) for r, (s, _) in instances]
    if stream_step is not None:
        order.insert(0, None)  # None: the stream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(warmup + repeats):
            k = rnd % len(order)
            times: dict[int, list[float]] = {}
            faults: dict[int, list[int]] = {}
            for entry in order[k:] + order[:k]:  # rotate: no contender always follows the same one
                if entry is None:
                    t = _timed(stream_step, dev)
                    if rnd >= warmup:
                        stream_times.append(t)
                    continue
                r, s = entry
                if r.error is not None:
                    continue
                if s.refill:
                    s.refill()
                before = minor_page_faults()
                try:
                    times.setdefault(id(r), []).append(_timed(s.step, dev))
                except Exception as exc:  # noqa: BLE001
                    r.error = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                if before is not None:
                    faults.setdefault(id(r), []).append(minor_page_faults() - before)
            if rnd < warmup:
                continue
            for r in {id(r): r for r, _ in instances}.values():
                if r.error is None and id(r) in times:
                    r.times.append(statistics.fmean(times[id(r)]))
                    if id(r) in faults:
                        r.page_faults.append(round(statistics.fmean(faults[id(r)])))
    return stream_times


def _memory_and_recompiles(r: Result, s: Stepper, dev: torch.device, recompile_steps: int) -> str | None:
    """Peak extra memory of one steady-state step into ``r``, then its recompiles under a changing LR.
    Returns how the memory was measured."""
    if s.refill:
        s.refill()
    gc.collect()
    method = None
    try:
        r.peak_extra_bytes, r.kept_bytes, method = peak_extra_memory(s.step, dev)
    except Exception as exc:  # noqa: BLE001
        method = f"n/a ({type(exc).__name__})"
    if r.compiled and recompile_steps > 0 and s.set_lr is not None:
        before = dynamo_graph_count()
        try:
            for i in range(recompile_steps):
                s.set_lr(1e-3 * (1.0 + 0.01 * i))
                if s.refill:
                    s.refill()
                s.step()
            r.recompiles = dynamo_graph_count() - before
        except Exception as exc:  # noqa: BLE001
            r.error = f"recompile check: {type(exc).__name__}: {exc}"[:300]
    return method


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str, na: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return na
    return format(x, spec)


def markdown_table(rep: WorkloadReport) -> str:
    floor_ms = rep.floor_s * 1e3
    smed, siqr = median_iqr(rep.stream_times)
    lines = [
        f"### {rep.algo} on {rep.workload}: {rep.numel / 1e6:.2f}M params in {rep.n_tensors} tensors, "
        f"{str(rep.dtype).replace('torch.', '')}",
        "",
        f"Floor: {rep.bytes_per_param:g} B/param ({rep.bytes_note}) x {rep.numel / 1e6:.2f}M / "
        f"{rep.bandwidth / 1e9:.1f} GB/s in-place streaming (x.mul_ over {rep.bytes_per_param * rep.numel / 2e6:.0f} MB, "
        f"median {smed * 1e3:.2f} ms, IQR {siqr * 1e3:.2f} ms) = **{floor_ms:.2f} ms**.",
        "",
    ]
    if rep.builds > 1:
        lines += [
            f"Each contender built {rep.builds} times (in order, then in reverse) and every build timed in every "
            "round: a row's time in a round is the mean of its builds'.",
            "",
        ]
    else:
        lines += ["Each contender timed on one build.", ""]
    if rep.state_theory is not None:
        sb = rep.state_theory[0]
        checks = []
        for r in rep.results:
            if r.error is None and r.family == "opdsl":
                ok = abs(r.state_bytes_per_param - sb) <= 0.02 * max(sb, 1.0) + 0.01
                checks.append(f"{r.name} {r.state_bytes_per_param:.2f} ({'ok' if ok else 'DIFFERS'})")
        lines.append(
            f"State in theory: {sb:.3g} B/param ({rep.state_theory[1]}); measured: "
            + ("; ".join(checks) if checks else "no opdsl row") + "."
        )
        lines.append("")
    any_flops = any(r.flops for r in rep.results)
    head = [
        "contender",
        "median ms",
        "IQR ms",
        "floor ms",
        "x floor",
        "first call s",
        "recompiles",
        "state B/param",
        "full-size states/tensor",
        "peak extra MB",
        "page faults/step",
    ]
    if any_flops:
        head.append("GFLOP/s")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rep.results:
        if r.error:
            row = [r.name, "error: " + r.error.replace("|", "/")] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(row) + " |")
            continue
        med = r.median
        extra = "-"
        if r.peak_extra_bytes is not None:
            extra = f"{r.peak_extra_bytes / 1e6:.1f}"
            if r.kept_bytes and r.kept_bytes > 1024:
                extra += f" (kept {r.kept_bytes / 1e6:.1f})"
        row = [
            r.name,
            f"{med * 1e3:.2f}",
            f"{r.iqr * 1e3:.2f}",
            f"{floor_ms:.2f}",
            f"{med / rep.floor_s:.2f}",
            f"{r.first_call_s:.2f}",
            "-" if r.recompiles is None else str(r.recompiles),
            _fmt(r.state_bytes_per_param, ".2f"),
            _fmt(r.state_full_per_param, ".2f"),
            extra,
            f"{statistics.median(r.page_faults):.0f}" if r.page_faults else "-",
        ]
        if any_flops:
            row.append(_fmt(r.flops / med / 1e9 if r.flops else None, ".1f"))
        lines.append("| " + " | ".join(row) + " |")
    notes = [r for r in rep.results if r.note]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"- {r.name}: {r.note}")
    lines.append("")
    return "\n".join(lines)
