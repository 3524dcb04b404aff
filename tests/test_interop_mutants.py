"""save_compressed_tensors: behaviours found unguarded by mutation testing (helper-174)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")
pytest.importorskip("compressed_tensors", reason="needs compressed-tensors (examples extra)")
import safetensors  # noqa: E402

from qround.errors import QroundError  # noqa: E402
from qround.interop import compressed_tensors_refusals, save_compressed_tensors  # noqa: E402

from .test_interop import BATCHES, load, logits, quantise, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stored(folder):
    """{key: (file, tensor)} of every safetensors file in the folder, and the files' metadata."""
    out, meta = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta[path.name] = f.metadata()
            for k in f.keys():
                out[k] = (path.name, f.get_tensor(k))
    return out, meta


def test_packed_layers_keep_no_float_weight_and_every_shard_tensor_is_indexed(tmp_path):
    # I25: the float weight left beside weight_packed (the folder as large as the float one);
    # I19: weight_shape missing from the shard index; I27: the files' metadata dropped
    qm = quantise(tiny_llama(1))
    out = tmp_path / "o"
    save_compressed_tensors(qm, out, max_shard_size="40KB")
    tensors, meta = stored(out)
    for name in qm.layers:
        assert f"{name}.weight" not in tensors
        assert {f"{name}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape")} <= set(
            tensors)
        assert tensors[f"{name}.weight_packed"][1].dtype == torch.int32
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {k: f for k, (f, _) in tensors.items()}
    assert all(m == {"format": "pt"} for m in meta.values())
    floats = sum(m.weight.numel() * m.weight.element_size() for n, m in
                 qm.model.named_modules() if n in qm.layers)
    packed = sum(t.nbytes for k, (_, t) in tensors.items() if k.endswith("weight_packed"))
    assert packed * 8 == floats          # 4-bit codes in int32 words: 1/8 of float32


def test_an_interrupt_while_writing_leaves_nothing(tmp_path, monkeypatch):
    # I26: the clean-up catches BaseException, so Ctrl-C leaves no hidden temporary folder
    import qround.interop

    qm = quantise(tiny_llama())

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(qround.interop, "_pack_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_compressed_tensors(qm, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_parent_that_is_a_file_is_named(tmp_path):
    # I21: the parent check gives its own message (not mkdir's errno) and writes nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(QroundError, match="is a file"):
        save_compressed_tensors(quantise(tiny_llama()), tmp_path / "f" / "out")
    assert os.listdir(tmp_path) == ["f"]


def test_a_model_with_save_pretrained_but_no_config_is_refused(tmp_path):
    # I23: both save_pretrained and config are needed
    qm = quantise(tiny_llama())

    class Saver(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def save_pretrained(self, folder, **kwargs):   # pragma: no cover (never reached)
            self.inner.save_pretrained(folder, **kwargs)

    qm.model = Saver(qm.model)
    assert any("not a transformers model" in w for w in compressed_tensors_refusals(qm))


class _Unrebuildable(transformers.LlamaForCausalLM):
    """A Llama whose class cannot be rebuilt from its config alone (an extra argument)."""

    def __init__(self, config, extra):
        super().__init__(config)


def _unrebuildable():
    base = tiny_llama()
    model = _Unrebuildable(base.config, None).eval()
    model.load_state_dict(base.state_dict())
    return model


def test_a_class_that_cannot_be_rebuilt_is_still_written(tmp_path, monkeypatch):
    # I12: a class that cannot be rebuilt from its config is no reason to fail
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qm = quantise(_unrebuildable())
    save_compressed_tensors(qm, tmp_path / "o")
    torch.testing.assert_close(logits(load(tmp_path / "o"), BATCHES[0]),
                               logits(qm.model, BATCHES[0]), rtol=1e-5, atol=1e-5)


def test_bias_correction_is_refused_when_the_class_cannot_be_rebuilt():
    # I11 and helper-174's defect: the rebuild's fallback let new biases through (transformers
    # then dropped them on loading); QuantizedModel.new_biases names them
    qm = quantise(_unrebuildable(), bias_correction=True)
    assert any("has no place for" in w for w in compressed_tensors_refusals(qm))


def test_new_biases_name_exactly_the_layers_bias_correction_gave_one():
    plain = quantise(_unrebuildable())
    corrected = quantise(_unrebuildable(), bias_correction=True)
    assert plain.new_biases == ()
    assert corrected.new_biases and set(corrected.new_biases) <= set(corrected.layers)
    assert all(dict(corrected.model.named_modules())[n].bias is not None
               for n in corrected.new_biases)
