"""compressed-tensors checkpoints (llm-compressor's pack-quantized format): written by qround,
read back by transformers, outputs equal to qround's quantised model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")
pytest.importorskip("compressed_tensors", reason="needs compressed-tensors (examples extra)")

from qround.errors import QroundError  # noqa: E402
from qround.files import _umask  # noqa: E402
from qround.interop import save_compressed_tensors  # noqa: E402
from qround.pipeline import QuantConfig, quantize_model  # noqa: E402

torch.set_num_threads(1)


def tiny_llama(seed=0, vocab=100):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=vocab, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


BATCHES = [torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))
           for i in range(3)]


def logits(model, batch):
    with torch.no_grad():
        return model(batch, use_cache=False).logits


def quantise(model, **options):
    config = QuantConfig(**{"wbits": 4, "solver": "fast", "progress": False,
                            "exclude": "lm_head", **options})
    return quantize_model(model, BATCHES, config, forward=logits)


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("options", [{}, {"wbits": 3, "group_size": 32}])
def test_transformers_loads_what_qround_wrote(tmp_path, monkeypatch, options):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = quantise(model, **options)
    out = tmp_path / "made" / "llama-ct"    # missing folders are made, as for qround's files
    save_compressed_tensors(qm, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    [group] = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    assert group["weights"]["num_bits"] == options.get("wbits", 4)
    assert group["weights"]["strategy"] == ("group" if "group_size" in options else "channel")
    loaded = load(out)
    for batch in BATCHES:
        torch.testing.assert_close(logits(loaded, batch), logits(qm.model, batch),
                                   rtol=1e-5, atol=1e-5)
    # the decompressed weights are qround's codes on qround's grids
    for name, qw in qm.layers.items():
        weight = dict(loaded.named_modules())[name].weight.detach().double().numpy()
        np.testing.assert_allclose(weight, qw.dequantized, rtol=1e-6, atol=1e-7)
    # and it is a different model from the float one, which is untouched
    assert not torch.allclose(logits(loaded, BATCHES[0]), logits(model, BATCHES[0]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_several_schemes_and_shards(tmp_path, monkeypatch):
    """first_last_bits gives two schemes (each group names its layers); small shards get an
    index whose entries name the packed tensors."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qm = quantise(tiny_llama(1), wbits=3, first_last_bits=8)
    out = tmp_path / "two"
    save_compressed_tensors(qm, out, max_shard_size="40KB")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert set(by_bits) == {3, 8}
    assert sorted(by_bits[3] + by_bits[8]) == sorted(qm.layers)
    assert "model.layers.0.self_attn.q_proj" in by_bits[8]    # the first layer and its k, v
    data = json.loads((out / "model.safetensors.index.json").read_text())
    index = data["weight_map"]
    assert len(set(index.values())) > 1
    assert all(f"{n}.weight" not in index and f"{n}.weight_packed" in index for n in qm.layers)
    import safetensors
    stored = 0
    for name in set(index.values()):
        with safetensors.safe_open(str(out / name), framework="pt") as f:
            stored += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert data["metadata"]["total_size"] == stored      # the packed sizes, not the float ones
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())   # not mkdtemp's private 0700
    torch.testing.assert_close(logits(load(out), BATCHES[0]), logits(qm.model, BATCHES[0]),
                               rtol=1e-5, atol=1e-5)


def test_per_layer_overrides_give_their_own_schemes(tmp_path, monkeypatch):
    """Mixed precision by layer name (down_proj at 8 bits, the MLP's other layers in groups of
    32): one scheme per (bits, group size), and transformers reads it back as qround has it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qm = quantise(tiny_llama(2), wbits=3, overrides={"down_proj": {"wbits": 8},
                                                     "mlp": {"group_size": 32}})
    out = tmp_path / "mixed"
    save_compressed_tensors(qm, out)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"]): sorted(g["targets"])
               for g in groups.values()}
    layers = sorted(qm.layers)
    assert schemes == {
        (8, None): [n for n in layers if "down_proj" in n],
        (3, 32): [n for n in layers if "gate_proj" in n or "up_proj" in n],
        (3, None): [n for n in layers if "self_attn" in n]}
    for batch in BATCHES:
        torch.testing.assert_close(logits(load(out), batch), logits(qm.model, batch),
                                   rtol=1e-5, atol=1e-5)


def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path):
    from .test_conv1d import tiny_gpt2

    model = tiny_llama()
    cases = [
        (quantise(model, symmetric=False), "asymmetric grids"),
        (quantise(model, bias_correction=True), "has no place for"),   # Llama: no biases
        (quantize_model(tiny_gpt2(), [torch.randint(0, 50, (2, 12))],
                        QuantConfig(wbits=4, progress=False),
                        forward=lambda m, b: m(b, use_cache=False).logits), "are Conv1D"),
        (quantize_model(nn.Sequential(nn.Linear(8, 8)), [torch.randn(16, 8)],
                        QuantConfig(wbits=4, progress=False)), "not a transformers model"),
    ]
    for qm, message in cases:
        with pytest.raises(QroundError, match=message):
            save_compressed_tensors(qm, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(QroundError, match="exists"):
        save_compressed_tensors(quantise(model), tmp_path / "taken")


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import qround.interop

    qm = quantise(tiny_llama())

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(qround.interop, "_pack_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed_tensors(qm, tmp_path / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    def appears(*args):   # the folder appears while qround writes
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("x")

    monkeypatch.setattr(qround.interop, "_pack_weights", appears)
    with pytest.raises(QroundError, match="did it appear meanwhile"):
        save_compressed_tensors(qm, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["theirs.txt"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """The tiny Llama saved as a checkpoint folder, with a small BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qround.zoo import sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences("calibration", n=200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(vocab=len(hf_tok)).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return str(folder)


def test_quantize_save_compressed_from_the_shell(llama_folder, tmp_path, monkeypatch, capsys):
    from qround import export
    from qround.cli import main
    from qround.zoo.hf import load_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, saved = tmp_path / "w4-ct", tmp_path / "w4.safetensors"
    assert main(["quantize", "--model", llama_folder, "--calibration-size", "16", "--wbits", "4",
                 "--group-size", "32", "--exclude", "lm_head", "--no-progress",
                 "--out", str(saved), "--save-compressed", str(out)]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert transformers.AutoTokenizer.from_pretrained(out)("a test.")["input_ids"]
    hf = load_hf(llama_folder)
    ours = export.load(hf.model, saved)
    [batch] = hf.batches(["The rounding of every weight is chosen.", "A second text."])
    with torch.no_grad():
        torch.testing.assert_close(load(out)(**batch).logits, ours(**batch).logits,
                                   rtol=1e-5, atol=1e-5)
    fresh = tmp_path / "new"
    for argv, message in ((["--asymmetric-grid"], "symmetric grids only"),
                          (["--abits", "8"], "weights only"),
                          (["--iterations", "5"], "block reconstruction"),
                          (["--bias-correction", "--calibration-size", "8"], "has no place")):
        assert main(["quantize", "--model", llama_folder, "--no-progress", "--save-compressed",
                     str(fresh), *argv]) == 2
        assert message in capsys.readouterr().err and not fresh.exists()
    assert main(["quantize", "--model", llama_folder, "--no-progress", "--save-compressed",
                 str(out)]) == 2
    assert "exists: give a new folder" in capsys.readouterr().err
    assert main(["quantize", "--model", "digits-cnn", "--no-progress", "--save-compressed",
                 str(tmp_path / "d")]) == 2
    assert "--model must be one" in capsys.readouterr().err
    assert main(["quantize", "--model", llama_folder, "--no-progress", "--save-compressed",
                 os.path.join(llama_folder, "inside")]) == 2
    assert "inside the input --model folder" in capsys.readouterr().err
    # --out inside the new folder would make it exist before the compressed export
    assert main(["quantize", "--model", llama_folder, "--no-progress", "--save-compressed",
                 str(fresh), "--out", str(fresh / "w4.safetensors")]) == 2
    assert "--out lies inside --save-compressed's path" in capsys.readouterr().err
    assert not fresh.exists()


def test_a_gpt2_folder_is_refused_before_any_work(llama_folder, tmp_path, capsys):
    import shutil

    from qround.cli import main

    folder = tmp_path / "gpt2"
    vocab = transformers.AutoTokenizer.from_pretrained(llama_folder).__len__()
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64)).save_pretrained(folder)
    for name in os.listdir(llama_folder):
        if "token" in name:
            shutil.copy(os.path.join(llama_folder, name), folder / name)
    assert main(["quantize", "--model", str(folder), "--calibration-size", "8", "--no-progress",
                 "--save-compressed", str(tmp_path / "out")]) == 2
    assert "layers are transformers' Conv1D (GPT-2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bias_correction_is_refused_only_for_layers_that_are_rounded(llama_folder, tmp_path,
                                                                     monkeypatch, capsys):
    """OPT: every projection has a bias; its bias-free lm_head is tied to the embedding and
    stays in float, so --bias-correction --save-compressed has nothing to refuse."""
    from qround.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(llama_folder)
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    word_embed_proj_dim=32, max_position_embeddings=64)
    folder = tmp_path / "opt"
    transformers.OPTForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    out, saved = tmp_path / "opt-ct", tmp_path / "opt.safetensors"
    assert main(["quantize", "--model", str(folder), "--calibration-size", "8", "--wbits", "4",
                 "--bias-correction", "--threads", "1", "--no-progress", "--out", str(saved),
                 "--save-compressed", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lm_head" in text and "tied weights" in text
    from qround import export
    from qround.zoo.hf import load_hf

    hf = load_hf(str(folder))
    ours = export.load(hf.model, saved)
    [batch] = hf.batches(["The rounding of every weight is chosen.", "A second text."])
    with torch.no_grad():
        theirs = load(out)(**batch).logits
        torch.testing.assert_close(theirs, ours(**batch).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs, hf.model(**batch).logits)  # it was quantised


# ------------------------------------------------ found by mutation testing (helper-118)
def test_group_as_wide_as_the_layer_is_per_channel(tmp_path):   # I1, I24
    qm = quantise(tiny_llama(), group_size=64)     # in=64 layers: per channel; down_proj: 2 groups
    save_compressed_tensors(qm, tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    schemes = {(g["weights"]["strategy"], g["weights"]["group_size"]): sorted(g["targets"])
               for g in cfg["config_groups"].values()}
    assert schemes == {("channel", None): sorted(n for n in qm.layers if "down_proj" not in n),
                       ("group", 64): sorted(n for n in qm.layers if "down_proj" in n)}
    assert cfg["qround_solver"] == "fast"      # I19


def test_bf16_scales_in_model_dtype(tmp_path):   # I10
    import safetensors
    qm = quantise(tiny_llama().to(torch.bfloat16))
    save_compressed_tensors(qm, tmp_path / "o")
    with safetensors.safe_open(str(tmp_path / "o" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("weight_scale")}
    assert dtypes == {torch.bfloat16}


def test_activation_stage_refused(tmp_path):   # I15
    qm = quantise(tiny_llama(), abits=8)
    with pytest.raises(QroundError, match="activation stage"):
        save_compressed_tensors(qm, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_quantised_weight_missing_from_the_saved_files_is_refused(tmp_path, monkeypatch):
    # I18: save_pretrained leaving out a quantised layer's weight (tied or renamed) is refused,
    # and no folder is left
    import safetensors.torch

    qm = quantise(tiny_llama())
    name = next(iter(qm.layers))
    real = type(qm.model).save_pretrained

    def dropping(self, folder, **kwargs):
        real(self, folder, **kwargs)
        [path] = sorted(Path(folder).glob("*.safetensors"))
        tensors = safetensors.torch.load_file(str(path))
        del tensors[f"{name}.weight"]
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})

    monkeypatch.setattr(type(qm.model), "save_pretrained", dropping)
    with pytest.raises(QroundError, match="wrote no weight"):
        save_compressed_tensors(qm, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
