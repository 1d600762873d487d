"""Where a compiled step's device time goes: a ``jax.profiler`` trace reduced to categories.

Each kernel (GPU) or thunk (CPU) in the trace names the HLO instruction it runs
(``args.hlo_op``). The compiled module's text gives every instruction its opcode,
its fused computation and the Python stack that built it (``stack_frame_id`` into
the module's FileNames / FunctionNames / FileLocations / StackFrames tables). A
kernel's category comes from those frames and opcodes (``categorize``): the
augmentation (blur apart), convolutions, BatchNorm and the losses, forward or
backward (``transpose(`` in the op name), queue and k-NN, optimizer and EMA,
copies, collectives, other elementwise work.

    from trace_breakdown import breakdown
    report = breakdown(hlo_text, trace_dir, steps=5)

Used by ``device_check.py --profile``; tested on CPU traces (``tests/test_trace_breakdown.py``).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import NamedTuple

CATEGORIES = (
    "collectives", "augmentation: blur", "augmentation: other", "queue and k-NN", "convolution forward",
    "convolution backward", "BatchNorm forward", "BatchNorm backward", "losses", "optimizer and EMA",
    "copies and transposes", "other elementwise forward", "other elementwise backward")
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
COPY_OPS = ("copy", "transpose", "copy-start", "copy-done", "bitcast", "dynamic-update-slice")


class Frame(NamedTuple):
    file: str
    function: str
    line: int


class Instruction(NamedTuple):
    name: str
    opcode: str
    op_name: str
    frames: tuple[Frame, ...]  # innermost first
    calls: tuple[str, ...]  # computations it runs (a fusion's body)
    target: str  # custom-call target, e.g. a cuDNN convolution


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) ")


def _fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=([^\s}]+)", text))


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """Instructions by name and, per computation, its instruction names."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    raw_frames: dict[str, int] = {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        row = _TABLE_ROW.match(line) if section else None
        if row:
            tables[section][int(row.group(1))] = row.group(2)
            continue
        section = None
        m = _INSTR.match(line)
        if m and current is not None:
            name, rest = m.groups()
            op = re.search(r"\s([a-z][\w\-]*)\(", " " + rest)
            meta = re.search(r"metadata=\{(.*?)\}(?:,|$)", rest)
            meta_text = meta.group(1) if meta else ""
            op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', meta_text)
            frame = re.search(r"stack_frame_id=(\d+)", meta_text)
            if frame:
                raw_frames[name] = int(frame.group(1))
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest)
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                calls += re.findall(r"%([\w.\-]+)", branches)
            target = re.search(r'custom_call_target="([^"]*)"', rest)
            instructions[name] = Instruction(name, op.group(1) if op else "", op_name.group(1) if op_name else "",
                                             (), tuple(calls), target.group(1) if target else "")
            computations[current].append(name)
            continue
        c = _COMPUTATION.match(line)
        if c and line.rstrip().endswith("{"):
            current = c.group(1)
    frames = _stack_frames(tables)
    for name, fid in raw_frames.items():
        instructions[name] = instructions[name]._replace(frames=frames.get(fid, ()))
    return instructions, dict(computations)


def _stack_frames(tables: dict[str, dict[int, str]]) -> dict[int, tuple[Frame, ...]]:
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {}
    for k, v in tables["FileLocations"].items():
        f = _fields(v)
        locations[k] = Frame(files.get(int(f.get("file_name_id", 0)), "?"),
                             functions.get(int(f.get("function_name_id", 0)), "?"), int(f.get("line", 0)))
    parents = {k: _fields(v) for k, v in tables["StackFrames"].items()}
    out = {}
    for fid in parents:
        chain, seen, cur = [], set(), fid
        while cur in parents and cur not in seen:  # a frame that names itself is a root
            seen.add(cur)
            chain.append(locations.get(int(parents[cur].get("file_location_id", 0)), Frame("?", "?", 0)))
            cur = int(parents[cur].get("parent_frame_id", 0))
        out[fid] = tuple(chain)
    return out


def _members(name: str, instructions: dict[str, Instruction], computations: dict[str, list[str]],
             depth: int = 2) -> list[Instruction]:
    """The instruction and those of the computations it calls (a fusion's body), two levels."""
    ins = instructions[name]
    out = [ins]
    if depth:
        for comp in ins.calls:
            for member in computations.get(comp, ()):
                out += _members(member, instructions, computations, depth - 1)
    return out


def categorize(name: str, instructions: dict[str, Instruction], computations: dict[str, list[str]]) -> str:
    """One category (``CATEGORIES``) for the kernel that runs instruction ``name``."""
    if name not in instructions:
        return "copies and transposes" if re.search(r"copy|transpose", name) else "other elementwise forward"
    members = _members(name, instructions, computations)
    opcodes = {m.opcode for m in members}
    files = {os.path.basename(f.file) + ":" + f.function for m in members for f in m.frames}
    paths = {f.file for m in members for f in m.frames}
    backward = any("transpose(" in m.op_name for m in members)
    side = "backward" if backward else "forward"

    def in_file(suffix: str) -> bool:
        return any(p.endswith(suffix) for p in paths)

    if any(o.startswith(COLLECTIVE_OPS) for o in opcodes):
        return "collectives"
    if any(f.startswith("augment.py:gaussian_blur") for f in files):
        return "augmentation: blur"
    if in_file("semppl_jax/augment.py"):
        return "augmentation: other"
    if in_file("semppl_jax/queue.py"):
        return "queue and k-NN"
    is_conv = "convolution" in opcodes or any("conv" in m.target.lower() for m in members)
    if is_conv:
        return f"convolution {side}"
    if in_file("haiku/_src/batch_norm.py") or in_file("haiku/_src/moving_averages.py"):
        return f"BatchNorm {side}"
    if in_file("semppl_jax/losses.py") or any("optax/losses" in p for p in paths):
        return "losses"
    if in_file("semppl_jax/optim.py") or any("/optax/" in p for p in paths):
        return "optimizer and EMA"
    if opcodes and opcodes <= set(COPY_OPS + ("parameter", "tuple", "get-tuple-element", "bitcast")):
        return "copies and transposes"
    return f"other elementwise {side}"


def source_line(ins: Instruction, instructions: dict[str, Instruction], computations: dict[str, list[str]]) -> str:
    """The innermost frame of the instruction (or its fused body) in the project, else any."""
    frames = [f for m in _members(ins.name, instructions, computations) for f in m.frames]
    for prefer in ("semppl_jax/", "haiku/", ""):
        for f in frames:
            if prefer in f.file:
                return f"{f.file.split('site-packages/')[-1].split('/work/main/')[-1]}:{f.line} ({f.function})"
    return "?"


def trace_events(trace_dir: str) -> list[dict]:
    """Complete events of the newest perfetto trace under ``trace_dir`` that ran an HLO
    instruction: device-stream kernels where the trace has them (GPU, TPU), else the
    CPU runtime's thunks."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    ran = [e for e in events if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
    device = [e for e in ran if re.search(r"/device:(GPU|TPU)", process.get(e.get("pid"), ""))]
    return device or ran


def _busy(events: list[dict]) -> tuple[float, float, list[float]]:
    """(union of busy time, span, idle gaps) in microseconds, over all streams together."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events)
    busy, gaps, (start, end) = 0.0, [], spans[0]
    first = start
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, end - first, gaps


def breakdown(hlo_text: str, trace_dir: str, steps: int, module: str | None = None, top: int = 20) -> dict:
    """Device time a step by category, busy fraction, idle gaps, kernels a step and the
    ``top`` most expensive instructions with their source lines."""
    instructions, computations = parse_hlo(hlo_text)
    events = trace_events(trace_dir)
    if module:
        events = [e for e in events if module in e["args"].get("hlo_module", "")]
    if not events:
        raise ValueError(f"the trace holds no kernel of module {module!r}")
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        per_op[e["args"]["hlo_op"]] += float(e.get("dur", 0.0))
    by_category: dict[str, float] = collections.defaultdict(float)
    category = {}
    for op, us in per_op.items():
        category[op] = categorize(op, instructions, computations)
        by_category[category[op]] += us
    total = sum(per_op.values())
    busy, span, gaps = _busy(events)
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return dict(
        steps=steps, kernels_per_step=len(events) / steps,
        kernel_ms_per_step=total / steps / 1e3, busy_ms_per_step=busy / steps / 1e3,
        span_ms_per_step=span / steps / 1e3, busy_fraction=busy / span if span else None,
        largest_idle_gaps_us=sorted(gaps, reverse=True)[:10],
        categories={c: dict(ms_per_step=by_category[c] / steps / 1e3, share=by_category[c] / total)
                    for c in CATEGORIES if by_category.get(c)},
        top_ops=[dict(op=op, ms_per_step=us / steps / 1e3, share=us / total, category=category[op],
                      opcode=instructions[op].opcode if op in instructions else "?",
                      source=source_line(instructions[op], instructions, computations) if op in instructions else "?")
                 for op, us in ranked],
    )


def table(report: dict) -> str:
    """The category breakdown as a Markdown table."""
    lines = ["| category | ms a step | share |", "| --- | --- | --- |"]
    for c, v in sorted(report["categories"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        lines.append(f"| {c} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% |")
    return "\n".join(lines)


def trace_steps(compiled, state, batch, steps: int, trace_dir: str):
    """Runs ``steps`` steps of a compiled step (after one untraced warm-up step) under
    ``jax.profiler`` into ``trace_dir``; returns the final state."""
    import jax

    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    finally:
        jax.profiler.stop_trace()
    return state
