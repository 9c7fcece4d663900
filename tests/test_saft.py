"""SAFT filtering: the subspace math on hand-built embeddings, AUROC, selection, the data
readers' file:line errors, the contaminated-set builder and the CLI end to end on the
tiny model."""

import json
import os
import math
from pathlib import Path

import pytest
import torch

from cfg_unlearn import saft
from cfg_unlearn.data.contaminated import build_contaminated, labelled_subset, write_jsonl
from cfg_unlearn.data.schema import PairFormatError
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.pii import contains_value
from cfg_unlearn.prompts import render_prompt
from cfg_unlearn.saft import (
    auroc,
    default_search_layers,
    fit_subspace,
    pool,
    read_labels,
    read_samples,
    resolve_layer,
    saft_scores,
    search,
    select,
)

# --------------------------------------------------------------------------- fixtures


def planted(n=200, d=16, frac=0.1, shift=8.0, seed=0):
    """Gaussian noise (unit variance) with the first ``frac`` rows shifted by ``shift``
    along a random unit direction: (embeddings, labels, direction)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    y = torch.zeros(n, dtype=torch.long)
    y[: int(n * frac)] = 1
    x[y == 1] += shift * u
    return x, y, u


# Four points whose SVD is known by hand: mean 0, directions e1 and e2 with singular
# values 6 (sqrt(4 * 3^2)) and 2 (sqrt(4 * 1^2)); projections p1 = +-3, p2 = +-1.
SQUARE = torch.tensor([[3.0, 1.0, 0.0], [-3.0, 1.0, 0.0], [3.0, -1.0, 0.0], [-3.0, -1.0, 0.0]])


# --------------------------------------------------------------------------- the math


def test_planted_direction_is_found_and_its_rows_score_highest():
    x, y, u = planted()
    sub = fit_subspace(x, 1)
    assert abs(float(sub.directions[:, 0] @ u.double())) > 0.98
    s = saft_scores(x, k=1)  # sign auto: the minority side scores high
    top = torch.topk(s, int(y.sum())).indices
    assert set(top.tolist()) == set(torch.nonzero(y).flatten().tolist())
    assert auroc(s, y) == 1.0
    assert auroc(saft_scores(x, k=1, sign="-"), y) == 0.0


def test_orientation_does_not_depend_on_the_svd_sign_or_the_row_order():
    x, y, _ = planted(seed=3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    a = saft_scores(x, k=1)
    b = saft_scores(x[perm], k=1)
    torch.testing.assert_close(a[perm], b)
    # the minority (planted) side has the long positive tail
    assert a[y == 1].mean() > 0 > a[y == 0].mean()


def test_scores_are_centred_an_offset_changes_nothing():
    x, _, _ = planted(seed=1)
    x = x.double()  # an offset of 100 in float32 would round the data itself
    for k, sign in ((1, "+"), (1, "abs"), (3, "abs")):
        torch.testing.assert_close(saft_scores(x + 100.0, k=k, sign=sign), saft_scores(x, k=k, sign=sign))
    sub = fit_subspace(x + 100.0, 2)
    torch.testing.assert_close(sub.mean, (x + 100.0).double().mean(0))


def test_hand_built_svd_k1_k2_and_weighting():
    sub = fit_subspace(SQUARE, 2)
    torch.testing.assert_close(sub.singular_values, torch.tensor([6.0, 2.0], dtype=torch.float64))
    # symmetric data has no skew: the fixed rule orients each direction by its largest entry
    torch.testing.assert_close(sub.directions, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]],
                                                            dtype=torch.float64))
    torch.testing.assert_close(saft_scores(SQUARE, k=1, sign="+"), torch.tensor([3.0, -3, 3, -3], dtype=torch.float64))
    torch.testing.assert_close(saft_scores(SQUARE, k=1, sign="abs"), torch.full((4,), 3.0, dtype=torch.float64))
    # k = 2: the norm of (p1, p2) = sqrt(9 + 1); weighted by sigma_j / sigma_1 = (1, 1/3)
    torch.testing.assert_close(saft_scores(SQUARE, k=2), torch.full((4,), math.sqrt(10.0), dtype=torch.float64))
    torch.testing.assert_close(saft_scores(SQUARE, k=2, weighted=True),
                               torch.full((4,), math.sqrt(9 + 1 / 3), dtype=torch.float64))


def test_whitened_score_by_hand_and_its_invariance():
    """SQUARE: sigma (6, 2) over 4 rows, so the spreads are (3, 1); every row is at (+-3,
    +-1): 1 spread out on each direction, sqrt(2) on both."""
    torch.testing.assert_close(saft.whitened_scores(SQUARE, k=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(saft.whitened_scores(SQUARE, k=2), torch.full((4,), math.sqrt(2.0),
                                                                             dtype=torch.float64))
    # a direction without spread counts 0 (rows on a line: the second direction is noise-free)
    line = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [6.0, 12.0]])
    torch.testing.assert_close(saft.whitened_scores(line, k=2), saft.whitened_scores(line, k=1))
    # with every direction (k = d) it is the Mahalanobis distance: the same after any
    # invertible linear map of the embeddings, which the projection is not
    x, _, _ = planted(n=50, d=6, seed=3)
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(6)
    torch.testing.assert_close(saft.whitened_scores(x @ a, k=6), saft.whitened_scores(x, k=6))
    assert not torch.allclose(saft_scores(x @ a, k=6), saft_scores(x, k=6))


def test_whitened_score_finds_an_outlier_on_a_small_direction():
    """What it is for: 40 rows spread wide along one direction and narrowly along another,
    and 4 rows far out on the narrow one (in units of its spread) but not on the wide
    one. The projection ranks the wide rows first; the whitened score finds the 4."""
    g = torch.Generator().manual_seed(0)
    wide = torch.stack([torch.randn(40, generator=g) * 10, torch.randn(40, generator=g) * 0.5], 1)
    odd = torch.stack([torch.randn(4, generator=g), torch.full((4,), 3.0)], 1)
    x, y = torch.cat([wide, odd]), torch.tensor([0] * 40 + [1] * 4)
    top = lambda s: set(torch.argsort(s, descending=True)[:4].tolist())  # noqa: E731
    assert top(saft.whitened_scores(x, k=2)) == {40, 41, 42, 43}
    assert auroc(saft.whitened_scores(x, k=2), y) == 1.0
    assert auroc(saft_scores(x, k=2), y) < 0.5


def test_k_above_one_is_the_projection_norm_on_random_data():
    x, _, _ = planted(n=60, d=8, seed=2)
    xc = x.double() - x.double().mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    p = xc @ vh[:3].T
    torch.testing.assert_close(saft_scores(x, k=3), p.norm(dim=1))
    w = s[:3] / s[0]
    torch.testing.assert_close(saft_scores(x, k=3, weighted=True), (w * p**2).sum(1).sqrt())


def test_gram_path_and_svd_path_agree():
    x, _, _ = planted(n=40, d=8, seed=4)  # n > d: Gram eigenvectors
    wide = torch.cat([x, torch.zeros(40, 60)], 1)  # n < d: SVD
    torch.testing.assert_close(saft_scores(x, k=2), saft_scores(wide, k=2))
    torch.testing.assert_close(saft_scores(x, k=1), saft_scores(wide, k=1))


def test_bad_k_and_sign_are_refused():
    x, _, _ = planted(n=10, d=4)
    with pytest.raises(ValueError, match="k must be in"):
        fit_subspace(x, 5)
    with pytest.raises(ValueError, match="k must be in"):
        fit_subspace(x[:3], 3)  # 3 centred rows span 2 dimensions
    with pytest.raises(ValueError, match="needs k=1"):
        saft_scores(x, k=2, sign="+")
    with pytest.raises(ValueError, match="sign must be"):
        saft_scores(x, k=1, sign="up")
    with pytest.raises(ValueError, match="NaN"):
        fit_subspace(torch.full((5, 3), float("nan")), 1)


# --------------------------------------------------------------------------- AUROC


def test_auroc_perfect_inverse_ties_and_random():
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.ones(4), y) == 0.5
    # Mann-Whitney with a tie: positives {2, 3}, negatives {1, 2}:
    # (2>1) + (2=2)/2 + (3>1) + (3>2) = 3.5 of 4 pairs
    assert auroc([1.0, 2.0, 2.0, 3.0], [0, 1, 0, 1]) == pytest.approx(0.875)
    g = torch.Generator().manual_seed(0)
    ys = torch.randint(0, 2, (4000,), generator=g)
    assert auroc(torch.rand(4000, generator=g), ys) == pytest.approx(0.5, abs=0.03)


def test_auroc_matches_torchmetrics_with_heavy_ties():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 5, (300,), generator=g).float()  # five distinct values: many ties
    y = (torch.rand(300, generator=g) < 0.3 + 0.1 * s).long()
    assert auroc(s, y) == pytest.approx(float(binary_auroc(s, y)), abs=1e-6)


def test_auroc_refuses_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="scores but"):
        auroc([0.1, 0.2, 0.3], [0, 1])


# --------------------------------------------------------------------------- select


def test_select_by_fraction_removes_the_top_scores():
    s = torch.arange(50, dtype=torch.float64)
    removed, thr = select(s, fraction=0.1)
    assert removed.sum() == 5 and removed[45:].all() and not removed[:45].any()
    assert thr == 45.0
    assert select(s, fraction=0.0) == (pytest.approx(torch.zeros(50, dtype=torch.bool)), None)
    assert select(s, fraction=1.0)[0].all()
    assert int(select(torch.arange(10.0), fraction=0.25)[0].sum()) == 3  # 2.5 rounds half up


def test_select_ties_at_the_cut_follow_row_order():
    removed, thr = select(torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0]), fraction=0.4)
    assert removed.tolist() == [False, True, True, False, False] and thr == 5.0


def test_select_by_threshold_is_at_or_above():
    """Inclusive, so the threshold a fraction run reports (its lowest removed score),
    given back as --threshold, removes the same samples (it removed one fewer)."""
    s = torch.tensor([0.5, 1.0, 1.5, 2.0])
    removed, thr = select(s, threshold=1.0)
    assert removed.tolist() == [False, True, True, True] and thr == 1.0
    scores = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    by_fraction, reported = select(scores, fraction=0.1)
    assert torch.equal(select(scores, threshold=reported)[0], by_fraction) and int(by_fraction.sum()) == 3
    with pytest.raises(ValueError, match="exactly one"):
        select(s, fraction=0.1, threshold=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        select(s)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select(s, fraction=1.5)


# --------------------------------------------------------------------------- search, layers


def test_search_picks_the_planted_layer_k1_and_sign():
    x, y, _ = planted(seed=5)
    noise = torch.randn(*x.shape, generator=torch.Generator().manual_seed(9))
    idx = torch.arange(0, 200, 2)  # half the rows are labelled
    table, best = search({1: noise, 2: x}, idx, y[idx], ks=[1, 2, 3], prefer_layer=1)
    assert len(table) == 2 * (3 + 1 + 1)  # per layer: k=1 (+, -, abs), k=2 abs, k=3 abs
    assert (best.layer, best.k, best.sign, best.auroc) == (2, 1, "+", 1.0)
    minus = next(c for c in table if (c.layer, c.k, c.sign) == (2, 1, "-"))
    assert minus.auroc == 0.0
    # a fixed sign restricts the candidates
    table, best = search({2: x}, idx, y[idx], ks=[1, 2], signs=["abs"])
    assert {(c.k, c.sign) for c in table} == {(1, "abs"), (2, "abs")}


def test_layers_resolve_like_hidden_states():
    assert resolve_layer(-1, 4) == 4 and resolve_layer(0, 4) == 0 and resolve_layer(-5, 4) == 0
    for bad in (5, -6):
        with pytest.raises(ValueError, match="out of range"):
            resolve_layer(bad, 4)
    assert default_search_layers(4) == [1, 2, 3, 4]
    many = default_search_layers(32)
    assert len(many) <= 8 and 16 in many and many[0] == 1 and many[-1] == 32


def test_pool_mean_skips_the_first_token_and_last_takes_the_last_real_one():
    h = torch.arange(8.0).reshape(2, 4, 1)  # row 0: 0 1 2 3, row 1: 4 5 6 7
    lengths = torch.tensor([3, 1])
    assert pool(h, lengths, "mean").flatten().tolist() == [1.5, 4.0]  # mean(1, 2); a lone token stays
    assert pool(h, lengths, "last").flatten().tolist() == [2.0, 4.0]


# --------------------------------------------------------------------------- files


def _write(path, lines):
    path.write_text("".join(x + "\n" for x in lines))
    return path


CONV = {"id": "a", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("row, where", [
    ("{not json", "x.jsonl:2: invalid JSON"),
    (json.dumps({"id": "b"}), "x.jsonl:2: field 'messages': missing required field"),
    (json.dumps({**CONV, "id": "b", "label": 2}), "x.jsonl:2: field 'label': expected 0 (benign) or 1"),
    (json.dumps({**CONV, "id": "b", "label": "leaky"}), "x.jsonl:2: field 'label'"),
    (json.dumps({"id": "b", "messages": [{"role": "bot", "content": "x"}]}), "x.jsonl:2: field 'messages[0].role'"),
    (json.dumps({"id": "b", "messages": []}), "x.jsonl:2: field 'messages'"),
    (json.dumps({"id": "b", "prompt": "Q?", "chosen": "A."}), "x.jsonl:2: field 'rejected': missing"),
    (json.dumps({**CONV, "id": "b", "pii": [{"type": "EMAIL"}]}), "x.jsonl:2: field 'pii[0].value'"),
    (json.dumps(CONV), "x.jsonl:2: field 'id': duplicate id (first on line 1)"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, where):
    path = _write(tmp_path / "x.jsonl", [json.dumps(CONV), row])
    with pytest.raises(PairFormatError) as err:
        read_samples(path)
    assert str(err.value).startswith(f"{tmp_path}/{where}"), str(err.value)


def test_skip_mode_counts_bad_rows_and_keeps_raw_lines(tmp_path):
    ok2 = json.dumps({"id": "c", "prompt": "Q?", "chosen": "No.", "rejected": "Yes: 555-0100.", "label": True})
    path = _write(tmp_path / "x.jsonl", [json.dumps(CONV), "{broken", "", ok2])
    samples, lines, stats = read_samples(path, on_error="skip")
    assert [s.id for s in samples] == ["a", "c"] and lines == [json.dumps(CONV), ok2]
    assert (stats.skipped, stats.blank, stats.lines) == (1, 1, 4)
    # a pair row is the prompt plus the rejected answer (default) or the chosen one
    assert samples[1].messages[-1] == {"role": "assistant", "content": "Yes: 555-0100."} and samples[1].label == 1
    chosen, _, _ = read_samples(path, on_error="skip", pair_side="chosen")
    assert chosen[1].messages[-1]["content"] == "No."


def test_skip_mode_keeps_each_rows_own_line_past_an_over_long_one(tmp_path, monkeypatch):
    """The raw lines (written to kept/removed) are read by number as the rows were: a
    line skipped as too long neither shifts them nor is read whole (the file was read
    whole a second time)."""
    from cfg_unlearn.data import schema

    monkeypatch.setattr(schema, "MAX_LINE_BYTES", 200)
    ok2 = json.dumps({"id": "c", "prompt": "Q?", "chosen": "No.", "rejected": "Yes.", "label": True})
    path = _write(tmp_path / "x.jsonl", [json.dumps(CONV), "[" + "1, " * 100 + "1]", ok2])
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the file was read whole"))
    samples, lines, stats = read_samples(path, on_error="skip")
    assert [(s.id, s.line) for s in samples] == [("a", 1), ("c", 3)] and lines == [json.dumps(CONV), ok2]
    assert stats.skipped == 1


def test_labels_file_errors_name_the_line(tmp_path):
    labels = _write(tmp_path / "l.jsonl", [json.dumps({"id": "a", "label": 1}), json.dumps({"id": "zz", "label": 0})])
    with pytest.raises(PairFormatError, match=r"l\.jsonl:2: field 'id': no row of the data has this id"):
        read_labels(labels, {"a": 0})
    # a row with no id at all was reported as holding an id the data lacks
    no_id = _write(tmp_path / "n.jsonl", [json.dumps({"label": 1})])
    with pytest.raises(PairFormatError, match=r"n\.jsonl:1: field 'id': missing: a labels file other than the data "
                                              r"needs the ids"):
        read_labels(no_id, {"a": 0})
    bad = _write(tmp_path / "m.jsonl", [json.dumps({"id": "a", "label": 3})])
    with pytest.raises(PairFormatError, match=r"m\.jsonl:1: field 'label': expected 0 \(benign\) or 1 \(leaky\), got int 3$"):
        read_labels(bad)
    # a label field holding PII spans is named by kind only: it was quoted into the error
    spans = _write(tmp_path / "s.jsonl", [json.dumps({"id": "a", "label": [{"type": "LOC", "value": "12 Oak St"}]})])
    with pytest.raises(PairFormatError, match=r"s\.jsonl:1: field 'label': .*, got list$"):
        read_labels(spans)
    # rows without a label are skipped: the data file itself can be the labels file
    mixed = _write(tmp_path / "n.jsonl", [json.dumps({**CONV, "label": 0}), json.dumps({**CONV, "id": "b"})])
    assert read_labels(mixed) == {"a": 0}
    with pytest.raises(PairFormatError, match="no labelled row"):
        read_labels(_write(tmp_path / "o.jsonl", [json.dumps(CONV)]))


def test_a_label_contradicting_the_data_row_names_the_labels_line(tmp_path):
    labels = _write(tmp_path / "l.jsonl", [json.dumps({"id": "a", "label": 1}), json.dumps({"id": "b", "label": 1})])
    with pytest.raises(PairFormatError, match=r"l\.jsonl:2: field 'label': 1 contradicts the data row's own label 0"):
        read_labels(labels, {"a": 0, "b": 1}, {"a": 1, "b": 0})


def test_parser_takes_a_bare_minus_sign():
    a = saft.build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--sign", "-", "--k", "1"])
    assert (a.sign, a.k, a.layer, a.pooling, a.remove_fraction, a.threshold) == ("-", 1, None, "mean", None, None)


def test_render_sample_matches_the_chat_template(tiny_model_dir):
    from cfg_unlearn.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    msgs = CONV["messages"]
    text = saft.render_sample(tok, msgs)
    assert text == render_prompt(tok, msgs[:1], None) + "Hello." + tok.eos_token
    assert saft.render_sample(tok, msgs[:1], "Be kind.") == render_prompt(tok, msgs[:1], "Be kind.")


# --------------------------------------------------------------------------- the builder


def test_contaminated_command_writes_both_files_or_neither(tmp_path, capsys):
    from cfg_unlearn.data import contaminated

    contaminated.main(["--out", str(tmp_path / "a"), "--n", "20", "--people", "4"])
    labels = (tmp_path / "a" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 2 and len((tmp_path / "a" / "contaminated.jsonl").read_text().splitlines()) == 20
    with pytest.raises(SystemExit) as exc:  # more labels than rows: refused before anything is written
        contaminated.main(["--out", str(tmp_path / "b"), "--n", "20", "--people", "4", "--n-labelled", "30"])
    assert exc.value.code == 2 and "--n-labelled must be in [0, --n = 20]" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # zero labels is a valid request (an empty labels.jsonl); these were tracebacks
    contaminated.main(["--out", str(tmp_path / "z"), "--n", "10", "--people", "4", "--n-labelled", "0"])
    assert (tmp_path / "z" / "labels.jsonl").read_text() == ""
    (tmp_path / "f").write_text("x")
    for args, message in ((["--out", str(tmp_path / "c"), "--people", "0"], "--people must be >= 1, got 0"),
                          (["--out", str(tmp_path / "c"), "--n", "0"], "--n must be >= 1, got 0"),
                          (["--out", str(tmp_path / "f")], "is a file; give a directory"),
                          (["--out", str(tmp_path / "f" / "sub")], "cannot write there: Not a directory")):
        with pytest.raises(SystemExit) as exc:
            contaminated.main(args)
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "c").exists()
    # labels.jsonl a directory: refused before contaminated.jsonl is replaced (it was, then rc 2)
    (tmp_path / "a" / "labels.jsonl").unlink()
    (tmp_path / "a" / "labels.jsonl").mkdir()
    before = (tmp_path / "a" / "contaminated.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exc:
        contaminated.main(["--out", str(tmp_path / "a"), "--n", "30", "--people", "4"])
    assert exc.value.code == 2 and "labels.jsonl there is a directory" in capsys.readouterr().err
    assert (tmp_path / "a" / "contaminated.jsonl").read_bytes() == before


def test_contaminated_replaces_a_previous_set_only_with_overwrite(tmp_path, capsys):
    """A rerun into the same --out replaced the set and its labels unasked (a hand-edited
    labels file, or the input of a SAFT run, gone)."""
    from cfg_unlearn.data import contaminated

    contaminated.main(["--out", str(tmp_path), "--n", "20", "--people", "4"])
    (tmp_path / "labels.jsonl").write_text('{"id": "s00000", "label": 1}\n')  # edited by hand
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exc:
        contaminated.main(["--out", str(tmp_path), "--n", "30", "--people", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds contaminated.jsonl and labels.jsonl; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "contaminated.jsonl").unlink()  # one of the two is enough to refuse
    with pytest.raises(SystemExit):
        contaminated.main(["--out", str(tmp_path), "--n", "30", "--people", "4"])
    assert "holds labels.jsonl; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # in full, as every command's flags
        contaminated.main(["--out", str(tmp_path), "--n", "30", "--people", "4", "--overw"])
    assert "unrecognized arguments: --overw" in capsys.readouterr().err
    contaminated.main(["--out", str(tmp_path), "--n", "30", "--people", "4", "--overwrite"])
    assert len((tmp_path / "contaminated.jsonl").read_text().splitlines()) == 30
    assert (tmp_path / "labels.jsonl").read_bytes() != before["labels.jsonl"]


def _disk_fills_at_fsync(monkeypatch, n: int) -> list[int]:
    """``os.fsync`` fails with ENOSPC at its ``n``-th call; returns the calls made."""
    import errno

    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_contaminated_replaces_neither_file_when_the_disk_fills(tmp_path, capsys, monkeypatch):
    """labels.jsonl was flushed and renamed before contaminated.jsonl was flushed: a full
    disk then left the new labels beside the old data, contradicting it."""
    from cfg_unlearn.data import contaminated

    contaminated.main(["--out", str(tmp_path), "--n", "20", "--people", "4"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _disk_fills_at_fsync(monkeypatch, 2)
    with pytest.raises(SystemExit) as exc:
        contaminated.main(["--out", str(tmp_path), "--n", "30", "--people", "4", "--seed", "1", "--overwrite"])
    assert exc.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either


def test_saft_replaces_none_of_a_previous_runs_files_when_the_disk_fills(tiny_model_dir, small_set, tmp_path,
                                                                         monkeypatch):
    """Each file was renamed as soon as it was written: a full disk at the fourth left the
    new kept/removed/scores beside the old saft.json and histogram, which describe another
    selection."""
    _, _, d = small_set
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl"), "--out", str(out), "--quiet"]
    saft.main(args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = _disk_fills_at_fsync(monkeypatch, 4)
    with pytest.raises(OSError, match="No space left on device"):
        saft.main([*args, "--overwrite", "--remove-fraction", "0.3"])
    assert len(calls) == 4
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file left either


def test_saft_quiet_hides_transformers_loading_bar(tiny_model_dir, small_set, tmp_path, capsys):
    """CLI audit: saft --quiet turned off its embedding bar but not transformers' "Loading
    weights" bar."""
    from transformers.utils import logging as hf_logging

    _, _, d = small_set
    args = ["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl")]
    saft.main([*args, "--out", str(tmp_path / "loud")])
    err = capsys.readouterr().err
    assert "Loading weights" in err and "saft: embed" in err
    saft.main([*args, "--out", str(tmp_path / "quiet"), "--quiet"])
    err = capsys.readouterr().err
    assert "%|" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_the_default_labels_of_a_small_set_hold_both_classes(tmp_path, capsys):
    """--n below 15 gave one labelled row, so one class, and saft --labels refused it."""
    from cfg_unlearn.data.contaminated import main as build

    build(["--out", str(tmp_path / "c"), "--n", "10", "--people", "3"])
    labels = [json.loads(line)["label"] for line in (tmp_path / "c" / "labels.jsonl").read_text().splitlines()]
    assert sorted(labels) == [0, 1]
    build(["--out", str(tmp_path / "one"), "--n", "1", "--people", "3"])  # not refused for a default it chose
    printed = capsys.readouterr()
    assert "1 labels" in printed.out and "labels.jsonl holds one class only" in printed.err
    build(["--out", str(tmp_path / "none"), "--n", "20", "--people", "3", "--leak-fraction", "0"])
    assert "holds one class only (0 leaky of 2): saft --labels needs both" in capsys.readouterr().err


def test_contaminated_set_is_labelled_deterministic_and_not_separable_by_length():
    world = World(WorldConfig(seed=0, n_people=10))
    rows = build_contaminated(world, n=300, leak_fraction=0.1, seed=0)
    assert rows == build_contaminated(world, n=300, leak_fraction=0.1, seed=0)
    assert rows != build_contaminated(world, n=300, leak_fraction=0.1, seed=1)
    assert len(rows) == 300 and sum(r["label"] for r in rows) == 30
    assert len({r["id"] for r in rows}) == 300
    assert len({json.dumps(r["messages"]) for r in rows}) == 300
    values = [p for p in world.known_pii() if p.type != "NAME"]
    for r in rows:
        answers = " ".join(m["content"] for m in r["messages"] if m["role"] == "assistant")
        if r["label"]:
            assert r["pii"] and all(contains_value(answers, p["value"], p["type"]) for p in r["pii"])
        else:  # a benign row reveals no attribute of anyone
            assert not any(contains_value(answers, p.value, p.type) for p in values), r
    y = torch.tensor([r["label"] for r in rows])
    chars = torch.tensor([float(sum(len(m["content"]) for m in r["messages"])) for r in rows])
    assert 0.4 < auroc(chars, y) < 0.62  # a row's length says little about its label
    kinds = {r["kind"] for r in rows}
    assert {"fact", "refusal", "leak", "leak-conversation", "leak-mixed"} <= kinds
    facts_only = build_contaminated(world, n=300, leak_fraction=0.1, seed=0, hard_negatives=0.0)
    assert not any(r["kind"].startswith("refusal") for r in facts_only)
    y0 = torch.tensor([r["label"] for r in facts_only])
    chars0 = torch.tensor([float(sum(len(m["content"]) for m in r["messages"])) for r in facts_only])
    assert 0.4 < auroc(chars0, y0) < 0.7
    sub = labelled_subset(rows, 50, seed=0)
    assert len(sub) == 50 and sum(r["label"] for r in sub) == 5 and set(sub[0]) == {"id", "label"}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    world = World(WorldConfig(seed=0, n_people=6))
    rows = build_contaminated(world, n=60, leak_fraction=0.1, seed=0)
    d = tmp_path_factory.mktemp("saft_data")
    write_jsonl(d / "data.jsonl", rows)
    write_jsonl(d / "labels.jsonl", labelled_subset(rows, 30, seed=0))
    return world, rows, d


def test_embedding_does_not_depend_on_batching(tiny_model_dir):
    from cfg_unlearn.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    texts = [saft.render_sample(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for q, a in [("What is 2 plus 3?", "5."), ("Where does Ann Lee live? Tell me everything you know.",
                                                         "I can't share where a private person lives.")]]
    for pooling in ("mean", "last"):
        both, _ = saft.embed_layers(model, tok, texts, [1, -1], pooling=pooling, batch_size=2, progress=False)
        alone = saft.embed(model, tok, texts[:1], layer=1, pooling=pooling, progress=False)
        torch.testing.assert_close(both[1][:1], alone, atol=1e-5, rtol=1e-4)
        assert both[-1].shape == (2, model.config.hidden_size)
        # longest first in the input: embedded shortest first, each row still its own text's
        rev, _ = saft.embed_layers(model, tok, texts[::-1], [1], pooling=pooling, batch_size=1, progress=False)
        torch.testing.assert_close(rev[1][1:], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rev[1][:1], both[1][1:], atol=1e-5, rtol=1e-4)
    cut, n_cut = saft.embed_layers(model, tok, texts, [1], max_length=4, progress=False)
    assert n_cut == 2 and torch.isfinite(cut[1]).all()


def test_out_may_not_hold_the_input_data(tiny_model_dir, small_set, tmp_path, capsys):
    """SAFT writes kept.jsonl into --out: with --out the data's own folder it could replace
    the data itself, so that is refused before the model loads, --overwrite or not."""
    world, rows, d = small_set
    data = tmp_path / "in" / "kept.jsonl"
    data.parent.mkdir()
    data.write_text((d / "data.jsonl").read_text())
    before = data.read_text()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exc:
            saft.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(data.parent), "--quiet",
                       *extra])
        assert exc.value.code == 2 and "contains the input" in capsys.readouterr().err
    assert data.read_text() == before and sorted(p.name for p in data.parent.iterdir()) == ["kept.jsonl"]


def test_label_search_settings_are_refused_before_the_model_loads(small_set, tmp_path, capsys):
    """--search-k 0, or --sign + with no k=1 to search, failed only after every sample was
    embedded (minutes on a real model); they are refused first (the model here does not
    exist, so reaching it would be another error)."""
    _, _, d = small_set
    base = ["--model", str(tmp_path / "no-model"), "--data", str(d / "data.jsonl"), "--labels",
            str(d / "labels.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]
    for extra, why in ((["--search-k", "0"], "--search-k values must be >= 1, got [0]"),
                       (["--search-k", "2", "4", "--sign", "+", "--score", "projection"],
                        "--sign + scores k=1 only (k>1 scores the norm), but --search-k 2 4 has no 1"),
                       (["--sign", "+", "--score", "whitened"],
                        "--sign +/- and --weighted are options of --score projection"),
                       (["--weighted", "--score", "whitened"],
                        "--sign +/- and --weighted are options of --score projection")):
        with pytest.raises(SystemExit) as exc:
            saft.main([*base, *extra])
        assert exc.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_search_options_that_would_be_ignored_are_refused(small_set, tmp_path, capsys):
    """Without --labels, --search-k/--search-layers were ignored (layer 1, k=1 ran) and
    saft.json recorded them as if used; beside --layer/--k they were ignored too."""
    _, _, d = small_set
    base = ["--model", str(tmp_path / "no-model"), "--data", str(d / "data.jsonl"), "--out", str(tmp_path / "o"),
            "--quiet"]
    labels = ["--labels", str(d / "labels.jsonl")]
    for extra, why in ((["--search-k", "3"], "--search-k/--search-layers pick by AUROC on --labels"),
                       (["--search-layers", "2"], "--search-k/--search-layers pick by AUROC on --labels"),
                       ([*labels, "--layer", "1", "--search-layers", "2"], "--layer fixes what --search-layers"),
                       ([*labels, "--k", "1", "--search-k", "2"], "--k fixes what --search-k would search")):
        with pytest.raises(SystemExit) as exc:
            saft.main([*base, *extra])
        assert exc.value.code == 2 and why in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()


def test_data_that_cannot_be_read_twice_is_refused_before_reading(small_set, tmp_path, capsys):
    """A pipe (/dev/stdin, <(zcat ...)) gave an IndexError traceback: the rows' original
    lines are read on a second pass, which finds the pipe empty."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit) as exc:  # refused before opening it (which would block here)
        saft.main(["--model", "m", "--data", str(fifo), "--out", str(tmp_path / "o"), "--quiet"])
    assert exc.value.code == 2 and f"{fifo}: not a regular file" in capsys.readouterr().err


def test_labels_from_the_data_file_itself_follow_on_error_skip(tiny_model_dir, small_set, tmp_path):
    """--labels <the data file> --on-error skip: the data read skipped a bad labelled row,
    then the labels read stopped at it ("no row of the data has this id")."""
    _, _, d = small_set
    data = tmp_path / "data.jsonl"
    data.write_text((d / "data.jsonl").read_text() + '{"id": "bad", "messages": "oops", "label": 1}\n')
    result = saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o"),
                                           labels=str(data), on_error="skip", search_k=[1], progress=False))
    assert result["counts"]["skipped"] == 1 and result["counts"]["tuning_labelled"] == 60
    # and a separate labels file naming the skipped row: that label is skipped and counted too
    labels = tmp_path / "labels.jsonl"
    labels.write_text((d / "labels.jsonl").read_text() + '{"id": "bad", "label": 1}\n')
    result = saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o2"),
                                           labels=str(labels), on_error="skip", search_k=[1], progress=False))
    assert result["counts"]["tuning_labelled"] == 30 and result["counts"]["skipped_labels"] == 1
    # a malformed line of the labels file is skipped too; a file of nothing usable says so
    with_bad = _write(tmp_path / "labels_bad.jsonl", [labels.read_text().splitlines()[0], '{"id": "s", "label": "yes"}'])
    skipped: list[str] = []
    assert len(read_labels(with_bad, on_error="skip", skipped=skipped)) == 1 and skipped == [f"{with_bad}:2"]
    unknown = _write(tmp_path / "labels_unknown.jsonl", ['{"id": "x1", "label": 1}', '{"id": "x2", "label": 0}'])
    with pytest.raises(PairFormatError, match=r"no usable labelled row \(2 skipped\)"):
        read_labels(unknown, {"a": 0}, on_error="skip")
    with pytest.raises(PairFormatError, match="no row of the data has this id"):  # without skip: an error
        saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(d / "data.jsonl"), out=str(tmp_path / "o3"),
                                      labels=str(labels), search_k=[1], progress=False))


def test_ties_at_the_fraction_cut_are_said(tiny_model_dir, small_set, tmp_path, caplog):
    """The fraction removes exactly its count, ties broken by row order, so the reported
    threshold given back removes every tied row too: the run says how many."""
    _, rows, _ = small_set
    # two texts, ten copies each: every score one of two values
    same = [{**rows[i % 2], "id": f"r{i}"} for i in range(20)]
    data = _write(tmp_path / "same.jsonl", [json.dumps(r) for r in same])
    # on the CPU and in one batch: scores move by ~1e-9 with the batch's padding, and CUDA
    # picks its kernels by batch shape (on an H100 a smaller last batch broke the ties)
    with caplog.at_level("WARNING"):
        # (the projection: two points ten times each are equally far from their centre, so
        # the whitened score ties all 20)
        result = saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o"),
                                               device="cpu", progress=False, batch_size=32, score="projection"))
    assert result["counts"]["removed"] == 2
    assert "8 more rows score exactly the cut" in caplog.text and "would remove them too (10)" in caplog.text


def test_embeddings_without_variance_are_refused(tiny_model_dir, small_set, tmp_path):
    """Every row embedding the same scored 0 everywhere, and the fraction removed the first
    rows of the file, with only a tie warning."""
    _, rows, _ = small_set
    data = _write(tmp_path / "same.jsonl", [json.dumps({**rows[0], "id": f"r{i}"}) for i in range(20)])
    with pytest.raises(ValueError, match="the 20 embeddings are all the same"):
        saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o"),
                                      device="cpu", progress=False))
    assert not (tmp_path / "o").exists()


def test_cli_end_to_end_writes_every_output_atomically(tiny_model_dir, small_set, tmp_path, capsys, monkeypatch):
    world, rows, d = small_set
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.jsonl").write_text("stale\n" * 500)  # replaced, not appended to
    args = ["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl"), "--out", str(out), "--quiet",
            "--batch-size", "7"]
    with pytest.raises(SystemExit) as exc:  # a non-empty --out needs --overwrite
        saft.main(args)
    assert exc.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "kept.jsonl").read_text() == "stale\n" * 500
    written = []
    real = saft.atomic_write_files
    monkeypatch.setattr(saft, "atomic_write_files", lambda files: (written.extend(p.name for p, _ in files),
                                                                   real(files)))
    saft.main([*args, "--overwrite"])
    result = json.loads((out / "saft.json").read_text())
    assert sorted(written) == sorted(["kept.jsonl", "removed.jsonl", "scores.jsonl", "saft.json", "scores_hist.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files left behind

    raw = (d / "data.jsonl").read_text().splitlines()
    kept = (out / "kept.jsonl").read_text().splitlines()
    removed = (out / "removed.jsonl").read_text().splitlines()
    assert len(removed) == 6 and len(kept) == 54  # 10% of 60
    assert sorted(kept + removed) == sorted(raw)  # rows unchanged, byte for byte
    assert kept == [x for x in raw if x in set(kept)]  # input order kept
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in rows]
    assert {s["id"] for s in scores if s["removed"]} == {json.loads(x)["id"] for x in removed}
    assert all(s["label"] == r["label"] for s, r in zip(scores, rows))
    thr = result["threshold"]
    assert min(s["score"] for s in scores if s["removed"]) == thr
    assert max(s["score"] for s in scores if not s["removed"]) <= thr

    meta = result
    # the tiny model has 2 layers: the middle is 1; 60 rows: the whitened score on 60 // 10 directions
    assert meta["used"] == {"layer": 1, "pooling": "mean", "score": "whitened", "k": 6, "sign": "abs",
                            "weighted": False, "picked_by": "defaults"}
    assert meta["counts"]["samples"] == 60 and meta["counts"]["removed"] == 6 and meta["picked"] is None
    ev = meta["evaluation"]
    assert ev["labelled"] == 60 and ev["leaky"] == 6 and ev["removed_leaky"] == round(ev["recall"] * 6)
    assert (out / "scores_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    printed = capsys.readouterr()
    shown = printed.out + printed.err
    # the threshold printed in full: given back as --threshold it removes the same rows (.4g did not)
    assert f"removed 6 of 60 (threshold {thr!r})" in shown and float(repr(thr)) == thr
    for item in world.known_pii():  # no PII value, name or row text reaches the console
        assert item.value not in shown
    assert rows[0]["messages"][0]["content"] not in shown


def test_without_labels_the_whitened_score_takes_its_documented_k(tiny_model_dir, tmp_path):
    """min(64, rows // 10) directions: 200 rows, 20. A review fix had the label-free path
    take the label search's smallest k, min(8, rows // 10): every file of 90 rows or more
    was scored on 8 directions, not the documented (and measured) default."""
    rows = build_contaminated(World(WorldConfig(seed=0, n_people=6)), n=200, leak_fraction=0.1, seed=0)
    write_jsonl(tmp_path / "data.jsonl", rows)
    saft.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"),
               "--quiet"])
    used = json.loads((tmp_path / "out" / "saft.json").read_text())["used"]
    assert (used["score"], used["k"]) == ("whitened", 20) == ("whitened", saft.default_whitened_k(200, 10**6))


def test_cli_with_labels_picks_and_prints_the_table(tiny_model_dir, small_set, tmp_path, capsys):
    world, rows, d = small_set
    out = tmp_path / "out"
    saft.main(["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl"), "--out", str(out),
               "--labels", str(d / "labels.jsonl"), "--search-k", "1", "2", "--threshold", "0", "--quiet",
               "--score", "projection"])
    result = json.loads((out / "saft.json").read_text())
    printed = capsys.readouterr().out
    assert "AUROC on 30 labelled rows (3 leaky)" in printed and "picked the projection score, layer" in printed
    assert len(result["search"]) == 2 * 4  # layers 1, 2 x (k=1: +, -, abs; k=2: abs)
    best = max(c["auroc"] for c in result["search"])
    assert result["picked"]["auroc"] == best and result["used"]["picked_by"] == "labels"
    assert (result["used"]["layer"], result["used"]["k"], result["used"]["sign"]) == (
        result["picked"]["layer"], result["picked"]["k"], result["picked"]["sign"])
    assert result["counts"]["tuning_labelled"] == 30
    assert result["evaluation_untuned"]["labelled"] == 30  # the data's own labels on the other rows
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert sum(s["removed"] for s in scores) == sum(s["score"] > 0 for s in scores) == result["counts"]["removed"]
    for item in world.known_pii():
        assert item.value not in printed


def test_cli_with_labels_searches_both_scores_by_default(tiny_model_dir, small_set, tmp_path, capsys):
    """Without --score, labels search both: the whitened score at k from (8, 16, 32, 64),
    each capped at one direction per 10 rows (60 rows: all 6), and the projection at k
    1..5 (k = 1 with each sign); --sign + alone means the projection."""
    _, _, d = small_set
    base = dict(model=str(tiny_model_dir), data=str(d / "data.jsonl"), labels=str(d / "labels.jsonl"),
                progress=False)
    result = saft.run_saft(saft.SaftConfig(out=str(tmp_path / "o"), **base))
    got = {(c["score"], c["layer"], c["k"], c["sign"]) for c in result["search"]}
    assert {c for c in got if c[0] == "whitened"} == {("whitened", 1, 6, "abs"), ("whitened", 2, 6, "abs")}
    assert {c for c in got if c[0] == "projection"} == {
        ("projection", layer, k, sign) for layer in (1, 2) for k, sign in
        [(1, "+"), (1, "-"), (1, "abs"), (2, "abs"), (3, "abs"), (4, "abs"), (5, "abs")]}
    assert len(got) == len(result["search"]) == 16
    best = max(result["search"], key=lambda c: c["auroc"])["auroc"]
    assert result["picked"]["auroc"] == best and result["used"]["score"] == result["picked"]["score"]
    assert ("Mahalanobis" in result["method"]) == (result["used"]["score"] == "whitened")
    signed = saft.run_saft(saft.SaftConfig(out=str(tmp_path / "p"), sign="+", **base))
    assert {(c["score"], c["k"], c["sign"]) for c in signed["search"]} == {("projection", 1, "+")}


def test_cli_fixed_options_are_not_searched(tiny_model_dir, small_set, tmp_path, capsys):
    _, _, d = small_set
    result = saft.run_saft(saft.SaftConfig(
        model=str(tiny_model_dir), data=str(d / "data.jsonl"), out=str(tmp_path / "o"), labels=str(d / "data.jsonl"),
        layer=-1, k=1, sign="-", pooling="last", progress=False, score="projection"))
    assert {(c["layer"], c["k"], c["sign"]) for c in result["search"]} == {(2, 1, "-")}
    assert result["used"]["pooling"] == "last"


def test_too_many_directions_are_refused_before_embedding_not_replaced_by_k1(tiny_model_dir, small_set, tmp_path,
                                                                              capsys, monkeypatch, caplog):
    """60 samples span at most 59 directions: `--k 60` with labels used to run as k=1 and
    say nothing (saft.json: settings k 60, used k 1); a too-large search k is skipped
    with a warning; a non-finite threshold is refused (it wrote "threshold": NaN)."""
    _, _, d = small_set
    monkeypatch.setattr(saft, "embed_layers", lambda *a, **kw: pytest.fail("embedded before refusing"))
    base = ["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]
    for extra in (["--k", "60", "--labels", str(d / "labels.jsonl")], ["--k", "60"], ["--threshold", "nan"]):
        with pytest.raises(SystemExit) as e:
            saft.main([*base, *extra])
        assert e.value.code == 2, extra
    err = capsys.readouterr().err
    assert err.count("k=60: 60 samples of dimension 128 span at most 59 directions") == 2
    assert "--threshold must be a finite number" in err and not (tmp_path / "o").exists()
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        result = saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(d / "data.jsonl"),
                                               out=str(tmp_path / "o"), labels=str(d / "labels.jsonl"), layer=1,
                                               search_k=[1, 60], progress=False))
    assert {c["k"] for c in result["search"]} == {1}
    assert any("k [60] skipped where above 58 (whitened), 59 (projection)" in r.getMessage() for r in caplog.records)


def test_the_whitened_score_takes_at_most_n_minus_2_directions(tiny_model_dir, small_set, tmp_path, capsys):
    """On all n - 1 directions the centred rows span, every row is sqrt(n - 1) from the
    centre: `--k 59` of 60 rows scored every row the same, and the histogram failed."""
    _, _, d = small_set
    with pytest.raises(ValueError, match=r"is sqrt\(59\) for every row: use k <= 58"):
        saft.whitened_scores(torch.randn(60, 128, generator=torch.Generator().manual_seed(0)), k=59)
    with pytest.raises(SystemExit) as e:
        saft.main(["--model", str(tiny_model_dir), "--data", str(d / "data.jsonl"), "--out", str(tmp_path / "o"),
                   "--quiet", "--k", "59"])
    assert e.value.code == 2 and "(the whitened score takes at most 58" in capsys.readouterr().err
    r = saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(d / "data.jsonl"), out=str(tmp_path / "p"),
                                      k=58, progress=False))
    scores = [json.loads(x)["score"] for x in (tmp_path / "p" / "scores.jsonl").read_text().splitlines()]
    assert r["used"]["k"] == 58 and max(scores) - min(scores) > 1e-3 * max(scores)


def test_whitened_score_ignores_directions_of_float32_rounding():
    """Rank-1 float32 rows have two more directions of rounding noise (about 1e-8 of the
    first); the 1e-12 cutoff gave them full weight, and they reordered the rows."""
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(40, generator=g), torch.randn(8, generator=g)
    x = t[:, None] * v
    torch.testing.assert_close(saft.whitened_scores(x, k=3), saft.whitened_scores(x, k=1))
    order = torch.argsort(saft.whitened_scores(x, k=3), descending=True)
    assert order[:5].tolist() == torch.argsort((t - t.mean()).abs(), descending=True)[:5].tolist()


def test_cli_errors_exit_2_with_file_line(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [json.dumps(CONV), json.dumps({"id": "b", "messages": "hi"})])
    with pytest.raises(SystemExit) as e:
        saft.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    assert e.value.code == 2
    assert f"{data}:2: field 'messages'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on a bad input
    with pytest.raises(SystemExit) as e:
        saft.main(["--model", "m", "--data", str(data), "--out", "o", "--remove-fraction", "0.1", "--threshold", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        saft.main(["--model", "m", "--data", str(data), "--out", "o", "--k", "2", "--sign", "+"])


def test_a_device_or_dtype_this_machine_cannot_use_is_a_usage_error(tmp_path, capsys):
    """`--device cuda` on a CPU-only machine was an AssertionError from inside torch,
    after the data was read and the model loaded."""
    base = ["--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    cases = [(["--device", "tpu9"], "unknown device 'tpu9'"), (["--dtype", "fp13"], "unknown dtype 'fp13'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no usable CUDA GPU"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            saft.main([*base, *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_labels_copy_without_ids_is_refused_even_under_the_data_files_name(tiny_model_dir, small_set, tmp_path):
    """A shuffled labelled copy of the data, without ids and with the data's file name in
    another folder, matched the data's rows by line number: labels on the wrong rows."""
    _, rows, _ = small_set
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    no_ids = [{k: v for k, v in r.items() if k != "id"} for r in rows]
    _write(a / "train.jsonl", [json.dumps({k: v for k, v in r.items() if k != "label"}) for r in no_ids])
    _write(b / "train.jsonl", [json.dumps(r) for r in reversed(no_ids)])
    with pytest.raises(PairFormatError, match=r"b/train.jsonl:1: field 'id': missing: a labels file other than the "
                                              r"data needs the ids"):
        saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(a / "train.jsonl"), out=str(tmp_path / "o"),
                                      labels=str(b / "train.jsonl"), progress=False))


def test_rows_are_rendered_as_the_template_does_and_a_refused_row_is_located(tiny_model_dir, tmp_path, capsys):
    """A template that drops system messages printed the row's own system text (PII) in an
    error about guidance, which SAFT does not use; one that refuses a row (alternating
    turns) crashed with jinja's traceback after the model loaded."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tpl = model / "chat_template.jinja"
    drops_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tpl.write_text(drops_system)
    secret = "Patient Jane Roe, DOB 1980-02-03"
    rows = [{"id": f"r{i}", "system": secret, "messages": [{"role": "user", "content": f"Question {i}?"},
                                                           {"role": "assistant", "content": f"Answer {i} " * i}]}
            for i in range(1, 7)]
    data = _write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    saft.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    assert secret not in capsys.readouterr().err
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    tpl.write_text(alternating)
    rows[3]["messages"].insert(0, {"role": "user", "content": "Hello?"})
    rows = [{k: v for k, v in r.items() if k != "system"} for r in rows]
    data = _write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(SystemExit) as exc:
        saft.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "d.jsonl:4: field 'messages': the tokenizer's chat template refuses this row " \
                                   "(Conversation roles must alternate" in err


def test_an_out_folder_that_cannot_be_written_is_refused_before_embedding(tiny_model_dir, small_set, tmp_path,
                                                                          monkeypatch):
    import errno
    import tempfile

    _, _, d = small_set
    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):  # a read-only mount (root ignores chmod)
        if dir is not None and Path(dir) == out:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(saft, "embed_layers", lambda *a, **k: pytest.fail("embedded"))
    with pytest.raises(ValueError, match=r"ro/saft.json: cannot write there: Read-only file system"):
        saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(d / "data.jsonl"), out=str(out),
                                      progress=False))


def test_scores_keep_integer_ids_and_a_blank_system_field_is_none(tiny_model_dir, small_set, tmp_path):
    _, rows, _ = small_set
    lines = [json.dumps({**r, "id": i, **({"system": ""} if i == 0 else {})}) for i, r in enumerate(rows[:8])]
    first = json.loads(lines[0])
    first["messages"] = [{"role": "system", "content": "You are helpful."}, *first["messages"]]
    lines[0] = json.dumps(first)  # "" beside a system message: none of its own, not "given both"
    data = _write(tmp_path / "ints.jsonl", lines)
    saft.run_saft(saft.SaftConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o"), progress=False))
    ids = [json.loads(x)["id"] for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    assert ids == list(range(8))


def test_a_layer_with_nan_embeddings_is_named_not_skipped_as_flat():
    """NaN compares False, so such a layer read as "every row embeds the same" and was
    skipped from the search; the NaN error (with its --dtype hint) is what it gets."""
    good = torch.randn(20, 8, dtype=torch.float64)
    bad = good.clone()
    bad[3, 2] = float("inf")
    labels = torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match="NaN or inf values"):
        saft.search({1: good, 2: bad}, torch.arange(10), labels, ks=[1])
