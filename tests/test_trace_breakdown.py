"""The profile reduction of ``benchmarks/device_check.py --profile``, on CPU traces."""

import collections
import glob
import gzip
import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import trace_breakdown as tb  # noqa: E402
from synthetic_batch import random_batch  # noqa: E402

from experiments import tiny  # noqa: E402
from semppl_jax import sharding, update_step  # noqa: E402

HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/x/semppl_jax/augment.py"
2 "/x/site-packages/haiku/_src/conv.py"
3 "/x/semppl_jax/networks.py"

FunctionNames
1 "gaussian_blur"
2 "__call__"
3 "block"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=30 end_line=30 column=1 end_column=2}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=1 parent_frame_id=3}

%fused_blur (p0: f32[4,3]) -> f32[4,3] {
  %p0 = f32[4,3]{1,0} parameter(0)
  ROOT %conv.1 = f32[4,3]{1,0} convolution(%p0, %p0), metadata={op_name="jit(step)/conv" stack_frame_id=3}
}

ENTRY %main.1 (a: f32[4,3], w: f32[3,8]) -> f32[4,8] {
  %a = f32[4,3]{1,0} parameter(0)
  %w = f32[3,8]{1,0} parameter(1)
  %blur_fusion = f32[4,3]{1,0} fusion(%a), kind=kLoop, calls=%fused_blur
  %convolution.2 = f32[4,8]{1,0} convolution(%blur_fusion, %w), metadata={op_name="jit(step)/conv" stack_frame_id=2}
  %convolution.3 = f32[4,8]{1,0} convolution(%a, %w), metadata={op_name="jit(s)/transpose(jvp(conv))" stack_frame_id=2}
  %all-gather.4 = f32[8,8]{1,0} all-gather(%convolution.2), dimensions={0}
  ROOT %copy.5 = f32[4,8]{1,0} copy(%convolution.3)
}
"""


def test_categories_from_frames_and_opcodes():
    ins, comps = tb.parse_hlo(HLO)
    assert ins["convolution.2"].frames[0] == tb.Frame("/x/site-packages/haiku/_src/conv.py", "__call__", 20)
    assert ins["convolution.2"].frames[1].function == "block"  # the parent frame
    got = {n: tb.categorize(n, ins, comps) for n in comps["main.1"] if ins[n].opcode != "parameter"}
    assert got == {"blur_fusion": "augmentation: blur", "convolution.2": "convolution forward",
                   "convolution.3": "convolution backward", "all-gather.4": "collectives",
                   "copy.5": "copies and transposes"}
    assert tb.source_line(ins["blur_fusion"], ins, comps) == "/x/semppl_jax/augment.py:10 (gaussian_blur)"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    config = tiny.get_config()
    config.training.batch_size = 8
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = sharding.replicate(update_step.init_state(config, jax.random.key(0), 10, 100, 10), mesh)
    batch = sharding.shard_batch(random_batch(config), mesh)
    compiled = sharding.shard_step(update_step.make_update_step(config, 10, 100, 10), mesh).lower(
        state, batch).compile()
    trace_dir = str(tmp_path_factory.mktemp("trace"))
    tb.trace_steps(compiled, state, batch, 2, trace_dir)
    return compiled.as_text(), trace_dir


def test_a_cpu_trace_of_the_update_step_is_accounted_for(traced):
    hlo, trace_dir = traced
    report = tb.breakdown(hlo, trace_dir, steps=2, module="update_step")
    # Independent total: every thunk event of the module in the raw trace file.
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[-1]
    with gzip.open(path) as f:
        raw = [e for e in json.load(f)["traceEvents"]
               if e.get("ph") == "X" and "update_step" in (e.get("args") or {}).get("hlo_module", "")]
    assert report["kernel_ms_per_step"] == pytest.approx(sum(e["dur"] for e in raw) / 2 / 1e3, rel=1e-9)
    assert report["kernels_per_step"] == len(raw) / 2
    assert sum(c["share"] for c in report["categories"].values()) == pytest.approx(1.0)
    for c in ("augmentation: other", "augmentation: blur", "convolution forward", "convolution backward",
              "BatchNorm forward", "BatchNorm backward", "queue and k-NN", "losses", "optimizer and EMA"):
        assert report["categories"].get(c, {}).get("ms_per_step", 0) > 0, c
    assert 0 < report["busy_fraction"] <= 1.0
    # Most of the most expensive instructions point at the code that built them (which ones
    # rank first moves with the machine's load: 15 or more of 20 idle, 12 on 2 busy cores).
    sources = [op["source"] for op in report["top_ops"]]
    assert len(sources) == 20 and sum(("semppl_jax/" in s or "haiku/" in s) for s in sources) > 10
    kinds = collections.Counter(op["category"] for op in report["top_ops"])
    assert kinds["convolution forward"] + kinds["convolution backward"] > 0
    assert "| convolution forward |" in tb.table(report)


def test_the_bare_step_without_batchnorm_has_none():
    """The profile's no-BatchNorm variant really drops every BatchNorm op (and keeps the convolutions)."""
    import profile_step
    from jax.sharding import PartitionSpec as P
    from step_bytes import bare_update

    config = tiny.get_config()
    config.training.batch_size = 4
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = sharding.replicate(update_step.init_state(config, jax.random.key(0), 10, 100, 10), mesh)
    batch = sharding.shard_batch(random_batch(config), mesh)

    def frames(wrap):
        fn = jax.jit(jax.shard_map(wrap(bare_update(config, 10, 100)), mesh=mesh, in_specs=(P(), P("data")),
                                   out_specs=(P(), P()), check_vma=False))
        ins, _ = tb.parse_hlo(fn.lower(state, batch).compile().as_text())
        return collections.Counter(os.path.basename(f.file) for i in ins.values() for f in i.frames[:1])

    with_bn, without = frames(lambda f: f), frames(profile_step._without_batchnorm)
    assert with_bn["batch_norm.py"] > 0 and without["batch_norm.py"] == 0
    assert without["conv.py"] > 0
