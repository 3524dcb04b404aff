"""The README's Python examples run as written, on a tiny model with the names they use."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_python_examples():
    blocks = _python_blocks()
    assert len(blocks) == 7
    # every fenced block is python (run here), bash, toml or plain text: a block tagged `py`
    # would be skipped silently
    tags = set(re.findall(r"^```(\w+)$", README.read_text(), flags=re.M))
    assert tags <= {"python", "bash", "toml", "text"}, tags
    # the plugin group README documents is the one the registry reads
    from qround.solvers import registry
    assert '[project.entry-points."qround.solvers"]' in README.read_text()
    assert registry.PLUGIN_GROUP == "qround.solvers"
    assert "encoder.0.fc1" in blocks[0] and "quantize_model" in blocks[1]
    assert "overrides=" in blocks[2] and "allocate(" in blocks[3]
    assert "register(" in blocks[5] and "QroundSampler" in blocks[6]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    # dimod and dwave-samplers are core dependencies: no skip, a missing one fails here
    from qround.solvers import registry

    # the last example registers two solvers: the registry is the process's, so restore it
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))
    gen = torch.Generator().manual_seed(0)
    model = _Net().eval()
    batches = [torch.randn(32, 16, generator=gen) for _ in range(4)]
    namespace = {"model": model, "batches": batches, "calibration_batches": batches}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 (our own README)
        if "overrides=" in block:
            config = namespace["config"]   # the per-layer settings, as the README explains them
    out = capsys.readouterr().out
    assert config.layer_options("model.layers.0.mlp.down_proj")["wbits"] == 8
    assert config.layer_options("model.layers.0.mlp.down_proj")["group_size"] == 128
    assert config.layer_options("model.layers.0.self_attn.k_proj")["group_size"] is None
    assert config.layer_options("model.layers.0.self_attn.v_proj")["group_size"] == 128
    ratios = {}
    for name in ("nearest", "greedy", "gptq+tabu", "quality"):
        found = re.search(rf"^{re.escape(name)} ([0-9.e-]+) [0-9.e-]+$", out, flags=re.M)
        assert found, name
        ratios[name] = float(found.group(1))
    assert ratios["nearest"] == 1.0 and max(ratios.values()) <= 1.0
    assert ratios["quality"] < 1.0 and ratios["quality"] <= ratios["greedy"] + 1e-9
    assert (tmp_path / "model-w3.safetensors").is_file()
    assert (tmp_path / "w2a4.safetensors").is_file()
    # the sensitivity example: every chosen layer measured, quantised at its allocated width
    sens, plan, mixed = namespace["sens"], namespace["plan"], namespace["qm_mixed"]
    assert [s.name for s in sens.layers] == ["encoder.0.fc1", "encoder.0.fc2", "encoder.1.fc1",
                                             "encoder.1.fc2", "head"]
    assert plan.mean_bits <= 3.5 and {r.layer: r.bits for r in mixed.report} == plan.bits
    # "+ activation steps, border coefficients, reconstruction units"
    from qround.export import read_metadata

    meta = read_metadata(tmp_path / "w2a4.safetensors")
    assert meta["units"] is not None and meta["units"]["granularity"] == "loss"
    from safetensors import safe_open

    with safe_open(tmp_path / "w2a4.safetensors", "pt") as f:
        keys = set(f.keys())
    for name in ("encoder.1.fc1", "head"):                 # quadratic borders: b0, b1, b2
        assert {f"{name}.act.step", f"{name}.act.b0", f"{name}.act.b2"} <= keys
    # the plugged-in solvers ran, inside a composition and in the pipeline
    sol, qm = namespace["sol"], namespace["qm"]
    assert sol.solver == "gptq+my-qubo|gptq+tabu-10ms" and 0 < sol.ratio < 1
    assert {r.solver for r in qm.report} == {"gptq+my-qubo"}
    # my_qubo_solver is a descent: its result has no improving single flip left
    problem = namespace["problem"]
    mine = registry.get_solver("my-qubo").solve(problem, seed=0)
    assert np.all(problem.flip_deltas(mine.choices)[problem.free] >= -1e-9)
    # the sampler example: both searched the same BQM, and dimod scored both
    ours, theirs, bqm = namespace["ours"], namespace["theirs"], namespace["bqm"]
    assert len(ours) == 2 and ours.vartype is bqm.vartype and theirs.vartype is bqm.vartype
    for ss in (ours, theirs):
        assert ss.first.energy == pytest.approx(bqm.energy(ss.first.sample))
    assert re.search(r"^qround tabu -[0-9.]+ [0-9.e-]+$", out, flags=re.M)
    # the examples leave the float model as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
