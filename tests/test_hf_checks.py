"""Behaviours of qround.zoo.hf (checkpoint folders) that no other test pins down: a tiny GPT-2
folder built here (as in test_hf_folder.py), its transformer used as an encoder."""
from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers",
                                   reason="needs transformers (examples extra)")
tokenizers = pytest.importorskip("tokenizers",
                                 reason="needs tokenizers (comes with transformers)")

from qround.errors import QroundError  # noqa: E402
from qround.zoo import sentences  # noqa: E402
from qround.zoo.hf import (HFModel, hf_batches, hf_metrics, load_hf,  # noqa: E402
                          perplexity, pooled)

END = "<|endoftext|>"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences("calibration", n=200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token=END, bos_token=END,
                                          unk_token=END)


def _gpt2(folder, tok, positions):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok),
                                     n_positions=positions, bos_token_id=tok.eos_token_id,
                                     eos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tok):
    return _gpt2(tmp_path_factory.mktemp("gpt2"), tok, 64)


@pytest.fixture(scope="module")
def padded_tok(gpt2_folder):
    return load_hf(gpt2_folder).tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


# ------------------------------------------------------------------ load_hf's max_length


def test_max_length_zero_is_refused(gpt2_folder):
    with pytest.raises(QroundError, match="max_length must be a positive integer, got 0"):
        load_hf(gpt2_folder, max_length=0)


def test_max_length_equal_to_the_positions_is_taken(gpt2_folder):
    assert load_hf(gpt2_folder, max_length=64).max_length == 64
    with pytest.raises(QroundError, match="takes at most 64 positions"):
        load_hf(gpt2_folder, max_length=65)


def test_default_max_length_is_128_for_a_model_with_more_positions(tmp_path, tok):
    folder = _gpt2(tmp_path / "long", tok, 200)
    assert load_hf(folder).max_length == 128
    assert load_hf(folder, max_length=200).max_length == 200


def test_load_sets_offline_variables_when_unset(gpt2_folder, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    load_hf(gpt2_folder)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_load_gives_transformers_logging_back(gpt2_folder):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_info()
        load_hf(gpt2_folder)
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)


# ------------------------------------------------------------------ batches


def test_batches_pad_on_the_right(gpt2_folder):
    hf = load_hf(gpt2_folder)
    [batch] = hf.batches(["short.", "a much longer sentence than the short one here."])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0 and bool(mask[1].all())


def test_token_id_check_is_exact_at_the_vocabulary_size(gpt2_folder):
    hf = load_hf(gpt2_folder)
    texts = sentences("calibration", n=8)
    top = max(int(b["input_ids"].max()) for b in hf.batches(texts))
    hf.model.resize_token_embeddings(top + 1)       # every id has an embedding: fine
    assert len(hf.batches(texts)) == 1
    hf.model.resize_token_embeddings(top)           # the largest id has none
    with pytest.raises(QroundError, match=f"token id {top}, but the model embeds only {top}"):
        hf.batches(texts)


def test_hf_batches_keep_every_text_in_order_and_truncate(padded_tok):
    tok = padded_tok
    texts = sentences("evaluation", n=5)
    out = hf_batches(tok, texts, batch_size=2, max_length=8)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    rows = [row for b in out for row in b["input_ids"]]
    for text, row, mask in zip(texts, rows, [m for b in out for m in b["attention_mask"]]):
        want = tok(text)["input_ids"][:8]
        assert row[mask.bool()].tolist() == want
    assert all(b["input_ids"].shape[1] <= 8 for b in out)
    assert max(b["input_ids"].shape[1] for b in out) == 8   # the texts are longer than 8


@pytest.mark.parametrize("texts", [["fine", "   "], ["fine", ""]])
def test_hf_batches_refuse_blank_texts(padded_tok, texts):
    tok = padded_tok
    with pytest.raises(QroundError, match="non-empty strings"):
        hf_batches(tok, texts)


def test_hf_batches_refuse_batch_size_zero(padded_tok):
    tok = padded_tok
    with pytest.raises(QroundError, match="batch_size must be a positive integer, got 0"):
        hf_batches(tok, ["fine"], batch_size=0)


# ------------------------------------------------------------------ metrics


def test_perplexity_of_one_token_texts_is_refused(gpt2_folder):
    hf = load_hf(gpt2_folder)
    batch = {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1,
                                                                              dtype=torch.long)}
    with pytest.raises(QroundError, match="at least two tokens"):
        perplexity(hf.model, [batch])


def test_pooled_is_the_mean_over_real_tokens_only(gpt2_folder):
    hf = load_hf(gpt2_folder)
    encoder = hf.model.transformer
    texts = ["short.", "a much longer sentence than the short one here.", "middle length one."]
    padded = pooled(encoder, hf.batches(texts))
    alone = torch.cat([pooled(encoder, hf.batches([t])) for t in texts])
    assert padded.dtype == torch.float64 and padded.shape == (3, 32)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    [batch] = hf.batches(texts[:1])
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state.double()
    torch.testing.assert_close(padded[0], hidden[0].mean(0), rtol=1e-5, atol=1e-6)


def test_causal_metrics_are_the_quantised_over_the_float(gpt2_folder):
    hf = load_hf(gpt2_folder)
    texts = sentences("evaluation", n=6)
    other = _perturbed(hf.model)
    got = hf_metrics(hf, other, texts)
    ref, ours = perplexity(hf.model, hf.batches(texts)), perplexity(other, hf.batches(texts))
    assert ours != pytest.approx(ref, rel=1e-3)
    assert got["float_perplexity"] == pytest.approx(ref, rel=1e-12)
    assert got["quantized_perplexity"] == pytest.approx(ours, rel=1e-12)
    assert got["perplexity_ratio"] == pytest.approx(ours / ref, rel=1e-12)


def test_encoder_metrics_compare_the_quantised_model(gpt2_folder):
    loaded = load_hf(gpt2_folder)
    hf = HFModel(loaded.model.transformer, loaded.tokenizer, False, loaded.max_length)
    texts = sentences("evaluation", n=12)
    same = hf_metrics(hf, copy.deepcopy(hf.model), texts)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-9)
    moved = hf_metrics(hf, _perturbed(hf.model, scale=0.2), texts)
    assert moved["cosine"] < 1 - 1e-4


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_loading(tmp_path):
    with pytest.raises(QroundError, match="CUDA is not available"):
        load_hf(tmp_path, device="cuda")
