"""xc harvest --align: models with different tokenizers and widths, rows aligned by character offsets.

Three tiny models (byte-level BPE + GPT-2, WordPiece + BERT, word-level + Llama; 32, 48 and 24 wide) read
text with non-ASCII characters. Every check here recomputes what the store holds by brute force from
the tokenizers' own offsets and the models' own forward passes.
"""

import gzip
import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from transformers import AutoModel, AutoTokenizer

import tiny_models
from xcli import console
from xcli.cli import cli
from xcli.data import align
from xcli.data import store as st
from xcli.data.harvest import HarvestConfig, harvest
from xcli.lm.config import ModelSpec

NAMES = tuple(tiny_models.ALIGNED_MODELS)  # bpe, wordpiece, words


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    paths = tiny_models.build_aligned_models(root)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(tiny_models.aligned_corpus(40, seed=3)) + "\n", encoding="utf-8")
    return {**paths, "corpus": corpus, "documents": corpus.read_text(encoding="utf-8").splitlines()}


def tokenizers(aligned):
    return [AutoTokenizer.from_pretrained(aligned[name]) for name in NAMES]


def brute_force_boundaries(offsets) -> dict[int, int]:
    """c -> the last token ending at c, where every token up to it ends by c and every later one starts at c or after."""
    found = {}
    for c in range(1, int(offsets[:, 1].max(initial=0)) + 1):
        ending = [i for i in range(len(offsets)) if offsets[i, 1] == c]
        if not ending:
            continue
        i = max(ending)
        if all(offsets[j, 1] <= c for j in range(i + 1)) and all(offsets[j, 0] >= c for j in range(i + 1, len(offsets))):
            found[c] = i
    return found


def expected_rows(aligned, documents, content_lengths=None):
    """Per document, in order: (document, start, end, token index per model), by brute force; with
    content_lengths, without the spans of more tokens than a model's window holds."""
    rows = []
    toks = tokenizers(aligned)
    for d, text in enumerate(documents):
        offsets = [np.asarray(t(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
                   for t in toks]
        per_model = [brute_force_boundaries(o.reshape(-1, 2)) for o in offsets]
        common = sorted(set(per_model[0]).intersection(*per_model[1:]))
        for start, end in zip([0, *common[:-1]], common):
            index = [b[end] for b in per_model]
            before = [b[start] + 1 if start else 0 for b in per_model]
            if content_lengths is None or all(i - f + 1 <= n for i, f, n in zip(index, before, content_lengths)):
                rows.append((d, start, end, index))
    return rows


def run(aligned, tmp_path, name="a.zarr", **kw):
    kw.setdefault("layers", "1")
    kw.setdefault("context_length", 16)
    kw.setdefault("batch_size", 3)
    kw.setdefault("chunk_rows", 64)
    kw.setdefault("store_dtype", "float32")
    specs = tuple(ModelSpec(alias=n, id=str(aligned[n])) for n in NAMES)
    return st.open_store(harvest(HarvestConfig(models=specs, data=str(aligned["corpus"]), output=tmp_path / name,
                                               align=True, **kw)))


def test_common_boundaries_equal_brute_force_and_cover_the_same_text(aligned):
    toks = tokenizers(aligned)
    texts = list(tiny_models.ALIGNED_TEXT) + aligned["documents"][:10]
    spans_seen = 0
    for text in texts:
        tokenized = [align.tokenize(t, [text])[0] for t in toks]
        ends, index = align.common_boundaries([o for _, o in tokenized])
        per_model = [brute_force_boundaries(o) for _, o in tokenized]
        common = sorted(set(per_model[0]).intersection(*per_model[1:]))
        assert ends.tolist() == common and len(common) > 3
        for m, (_, offsets) in enumerate(tokenized):
            assert index[m].tolist() == [per_model[m][c] for c in common]
            # The tokens of each span are inside it and cover every non-space character of it.
            for start, end, first, last in zip([0, *common[:-1]], common, [-1, *index[m][:-1]], index[m]):
                own = offsets[first + 1:last + 1]
                assert (own[:, 0] >= start).all() and (own[:, 1] <= end).all()
                covered = {c for a, b in own for c in range(a, b)}
                assert all(c in covered for c in range(start, end) if not text[c].isspace()), (text, start, end)
                spans_seen += 1
    assert spans_seen > 100
    # Non-ASCII text is split differently: some spans are several tokens of one model (e.g. 🙂 in bytes).
    text = tiny_models.ALIGNED_TEXT[2]
    tokenized = [align.tokenize(t, [text])[0] for t in toks]
    assert len({len(ids) for ids, _ in tokenized}) > 1


def test_aligned_store_rows_are_the_brute_force_alignment(aligned, tmp_path):
    store = run(aligned, tmp_path)
    packings = store.alignment["packings"]
    lengths = [16 - len(packings[n]["prefix"]) - len(packings[n]["suffix"]) for n in NAMES]
    assert lengths == [15, 14, 15]  # BOS; [CLS] and [SEP]; <s>
    expected = expected_rows(aligned, aligned["documents"], lengths)
    # A long word is more byte-level BPE tokens than a window holds: its span has no row.
    assert len(expected_rows(aligned, aligned["documents"])) > len(expected)
    assert store.complete and store.n_tokens == len(expected) > 500
    assert [s.d for s in store.sources] == [tiny_models.ALIGNED_MODELS[n][1] for n in NAMES]  # 32, 48, 24
    rows = store.aligned_arrays()
    assert rows["document"].tolist() == [r[0] for r in expected]
    assert rows["char_start"].tolist() == [r[1] for r in expected]
    assert rows["char_end"].tolist() == [r[2] for r in expected]
    toks = tokenizers(aligned)
    for m, name in enumerate(NAMES):
        ids = [toks[m](aligned["documents"][r[0]], add_special_tokens=False)["input_ids"][r[3][m]] for r in expected]
        assert rows[f"aligned/{name}/tokens"].tolist() == ids
    first = store.token_arrays()  # tokens and position are the first model's
    assert np.array_equal(first["tokens"], rows["aligned/bpe/tokens"])
    assert np.array_equal(first["position"], rows["aligned/bpe/position"])
    # Every row's span is the text between two common boundaries; the long word's text is not aligned.
    meta = store.alignment
    total = sum(len(d) for d in aligned["documents"])
    spans = int((rows["char_end"] - rows["char_start"]).sum())
    assert meta["models"] == list(NAMES) and meta["characters"] == total
    assert meta["aligned_characters"] == spans and meta["aligned_fraction"] == pytest.approx(spans / total)
    assert 0.9 < meta["aligned_fraction"] < 1


def test_aligned_activations_are_each_models_own(aligned, tmp_path):
    store = run(aligned, tmp_path)
    rows = store.aligned_arrays()
    seq = store.token_arrays()["sequence"]
    toks = tokenizers(aligned)
    picks = np.random.default_rng(0).choice(store.n_tokens, 40, replace=False)
    for m, name in enumerate(NAMES):
        model = AutoModel.from_pretrained(aligned[name]).eval()
        acts = store.read(f"{name}.resid_post.1", 0, store.n_tokens)
        prefix, suffix = (store.alignment["packings"][name][k] for k in ("prefix", "suffix"))
        position = rows[f"aligned/{name}/position"]
        for r in picks:
            doc = aligned["documents"][rows["document"][r]]
            doc_ids = toks[m](doc, add_special_tokens=False)["input_ids"]
            # This row's token index in the document, from the brute-force alignment of its end character.
            offsets = np.asarray(toks[m](doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
            index = brute_force_boundaries(offsets)[int(rows["char_end"][r])]
            window_first = index - (int(position[r]) - len(prefix))
            # The window runs to the last row of its window, then the suffix ([SEP]: BERT reads both ways).
            same = np.nonzero(seq == seq[r])[0]
            last = index + int(position[same].max() - position[r])
            window = prefix + doc_ids[window_first:last + 1] + suffix
            assert len(window) <= 16
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([window]), output_hidden_states=True).hidden_states[2][0]
            torch.testing.assert_close(torch.from_numpy(acts[r]), hidden[int(position[r])], atol=2e-5, rtol=1e-4)


def test_one_to_one_fraction_counts_spans_of_one_token_in_every_model(aligned, tmp_path):
    store = run(aligned, tmp_path)
    expected = expected_rows(aligned, aligned["documents"], [15, 14, 15])
    one = 0
    for i, (d, start, end, index) in enumerate(expected):
        previous = expected[i - 1][3] if i and expected[i - 1][0] == d else [-1, -1, -1]
        if all(index[m] - previous[m] == 1 for m in range(3)):
            one += end - start
    assert 0 < one < store.alignment["aligned_characters"]
    assert store.alignment["one_to_one_characters"] == one


def test_budget_resume_and_cli(aligned, tmp_path, monkeypatch):
    whole = run(aligned, tmp_path, "whole.zarr")
    budget = run(aligned, tmp_path, "budget.zarr", tokens=150)
    assert budget.n_tokens == 150
    for name, values in budget.aligned_arrays().items():
        assert np.array_equal(values, whole.aligned_arrays()[name][:150])
    last_doc, last_end = int(budget.aligned_arrays()["document"][-1]), int(budget.aligned_arrays()["char_end"][-1])
    assert budget.alignment["characters"] == sum(len(d) for d in aligned["documents"][:last_doc]) + last_end

    # A run stopped after its second committed chunk resumes to the uninterrupted store.
    commits, real_commit = [0], st.StoreWriter._commit

    def stop_after_two(self, complete=False):
        real_commit(self, complete)
        commits[0] += 1
        if commits[0] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(st.StoreWriter, "_commit", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(aligned, tmp_path, "killed.zarr")
    monkeypatch.setattr(st.StoreWriter, "_commit", real_commit)
    partial = st.open_store(tmp_path / "killed.zarr")
    assert not partial.complete and partial.n_tokens == 128
    resumed = run(aligned, tmp_path, "killed.zarr", resume=True)
    assert resumed.n_tokens == whole.n_tokens and resumed.meta["alignment"] == whole.meta["alignment"]
    for name in [*(n for n, _ in st.row_arrays(whole.meta)), *(f"acts/{s}" for s in whole.names)]:
        assert np.array_equal(zarr.open_group(str(tmp_path / "killed.zarr"))[name][:],
                              zarr.open_group(str(tmp_path / "whole.zarr"))[name][:]), name
    for s in whole.names:
        np.testing.assert_array_equal(resumed.stats(s)["mean"], whole.stats(s)["mean"])

    # The command line: the fraction on stderr, the path on stdout; the refusals are one line.
    args = ["harvest", *(a for n in NAMES for a in ("-m", f"{n}={aligned[n]}")), "-l", "1", "-c", "16",
            "-d", str(aligned["corpus"])]
    result = CliRunner().invoke(cli, [*args, "--align", "-t", "100", "-o", str(tmp_path / "cli.zarr"), "--debug"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "cli.zarr") and "of the text read (" in result.stderr
    console.settings.debug = False  # --debug is process-wide
    # Windows of 4 tokens leave most spans without a row: a warning, even when stderr is no terminal.
    short = [a if a != "16" else "4" for a in args]
    result = CliRunner().invoke(cli, [*short, "--align", "-o", str(tmp_path / "short.zarr")])
    assert result.exit_code == 0 and "warning: aligned" in result.stderr and "--context-length" in result.stderr
    assert st.open_store(tmp_path / "short.zarr").alignment["aligned_fraction"] < 0.9
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "cli.zarr")])
    assert info.exit_code == 0, info.stderr
    for extra, fragment in [([], "--align"), (["--align", "--keep-special-tokens"], "exclude each other")]:
        result = CliRunner().invoke(cli, [*args, *extra, "-o", str(tmp_path / "no.zarr")])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert fragment in result.stderr and not (tmp_path / "no.zarr").exists()


def test_damaged_alignment_attributes_are_one_line(aligned, tmp_path):
    run(aligned, tmp_path, tokens=64)
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    meta = dict(group.attrs["xc"])
    for bad in ([], ["bpe"], ["bpe", "wordpiece", "words", "words"], "bpe", [1, 2, 3], ["bpe", "wordpiece", ".."]):
        group.attrs["xc"] = {**meta, "alignment": {**meta["alignment"], "models": bad}}
        with pytest.raises(st.BadInput, match="alignment"):
            st.open_store(tmp_path / "a.zarr")
    group.attrs["xc"] = meta
    del group["char_end"]
    with pytest.raises(st.BadInput, match="char_end"):
        st.open_store(tmp_path / "a.zarr")
    assert json.dumps(meta["alignment"])  # plain JSON


def test_train_classify_and_eval_run_on_an_aligned_store(aligned, tmp_path):
    """A byte-level BPE GPT-2 and a word-level GPT-NeoX, both 32 wide (as Llama-3.1-8B and Qwen3-8B are both
    4096): Latent Scaling projects one model's decoder direction onto the other's activations, so it needs
    sources of one width; the decoder norms need none."""
    words = AutoTokenizer.from_pretrained(aligned["words"])
    neox = tiny_models.build_model("gpt_neox", tmp_path / "neox", words, hidden=32)
    specs = (ModelSpec(alias="bpe", id=str(aligned["bpe"])), ModelSpec(alias="words", id=str(neox)))
    store = harvest(HarvestConfig(models=specs, data=str(aligned["corpus"]), output=tmp_path / "s.zarr", align=True,
                                  layers="1", context_length=32, batch_size=4, chunk_rows=128,
                                  store_dtype="float32"))
    invoke = CliRunner().invoke
    ckpt = tmp_path / "xc.safetensors"
    result = invoke(cli, ["train", str(store), "-o", str(ckpt), "--latents", "64", "--arch", "batchtopk", "--k", "4",
                          "--steps", "150", "--batch-size", "128", "--eval-fraction", "0.125", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.stderr
    result = invoke(cli, ["classify", str(ckpt), "--store", str(store), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 64
    norms = [r["rel_norm_B_over_A"] for r in rows if r["rel_norm_B_over_A"] is not None]
    assert len(norms) > 32 and all(0 <= r <= 1 for r in norms)
    assert all(r["model_A"] == "bpe" and r["model_B"] == "words" and -1 <= r["cosine_A_B"] <= 1 for r in rows)
    assert all("nu_epsilon" in r and "frequency" in r for r in rows)  # Latent Scaling ran on the store
    result = invoke(cli, ["eval", str(ckpt), str(store), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    fvu = report["fvu"]
    assert set(fvu) == {"bpe.resid_post.1", "words.resid_post.1"} and all(0 < v < 1 for v in fvu.values()), fvu
    assert 0 < report["l0"] < 16  # batchtopk at inference: a threshold, about k (4) per row
    # Each model spliced in its own tokens (measured against a brute force in tests/analysis/test_splice_aligned.py).
    result = invoke(cli, ["eval", str(ckpt), str(store), "--splice", "--windows", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    splice = json.loads(result.stdout)["splice"]
    assert set(splice) == {"bpe", "words"} and all(0 < m["spliced_fraction"] <= 1 for m in splice.values())

    # Neuronpedia examples per model: each model's slice shows the rows in its own tokens.
    from xcli.export import export
    from xcli.export.config import ExportConfig

    out = export(ExportConfig(ckpt, tmp_path / "np", store=store, features="0-7", device="cpu"))
    assert CliRunner().invoke(cli, ["export", "--check", str(out)]).exit_code == 0
    own = {"bpe": AutoTokenizer.from_pretrained(aligned["bpe"]), "words": words}
    aligned_rows = st.open_store(store).aligned_arrays()
    checked = differ = 0
    for alias, tokenizer in own.items():
        batch, = (out / "v1" / alias).glob("*/activations/batch-0.jsonl.gz")  # the model id is its alias
        with gzip.open(batch, "rt") as lines:
            records = [json.loads(line) for line in lines]
        for record in records:
            first = int(record["dataIndex"]) - record["qualifyingTokenIndex"]  # the example's rows, in order
            ids = aligned_rows[f"aligned/{alias}/tokens"][first:first + len(record["tokens"])].tolist()
            assert [t.strip() for t in record["tokens"]] == [tokenizer.decode([t]).strip() for t in ids]
            differ += any(words.decode([a]).strip() != own["bpe"].decode([b]).strip()
                          for a, b in zip(aligned_rows["aligned/words/tokens"][first:first + len(ids)],
                                          aligned_rows["aligned/bpe/tokens"][first:first + len(ids)]))
            checked += 1
    assert checked > 50 and differ > 10  # many examples read differently in the two tokenizations


def test_a_planted_difference_between_models_with_different_tokenizers_is_found(aligned, tmp_path):
    """Model B (word-level GPT-NeoX) gets one direction added to the embeddings of 16 words; model A (byte-level
    BPE GPT-2) has nothing of it. The crosscoder latent that detects those words' rows leans to B the most."""
    from transformers import AutoModelForCausalLM

    from xcli.crosscoder import model as cc

    words = AutoTokenizer.from_pretrained(aligned["words"])
    planted = tiny_models.build_model("gpt_neox", tmp_path / "planted", words, hidden=32)
    model = AutoModelForCausalLM.from_pretrained(planted)
    chosen = ["king", "queen", "river", "city", "tree", "red", "green", "blue", "big", "small", "old", "new", "fast",
              "slow", "happy", "sad"]
    ids = words.convert_tokens_to_ids(chosen)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[ids] += 4 * embeddings.norm(dim=1).mean() * direction / direction.norm()
    model.save_pretrained(planted)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_models.aligned_corpus(300, seed=3)) + "\n", encoding="utf-8")
    specs = (ModelSpec(alias="bpe", id=str(aligned["bpe"])), ModelSpec(alias="words", id=str(planted)))
    store = st.open_store(harvest(HarvestConfig(models=specs, data=str(corpus), output=tmp_path / "s.zarr",
                                                align=True, layers="1", context_length=32, batch_size=8,
                                                chunk_rows=512, store_dtype="float32")))
    ckpt = tmp_path / "xc.safetensors"
    result = CliRunner().invoke(cli, ["train", str(store.path), "-o", str(ckpt), "--latents", "64", "--arch",
                                      "batchtopk", "--k", "4", "--steps", "600", "--batch-size", "256", "--device",
                                      "cpu", "-q"])
    assert result.exit_code == 0, result.stderr
    result = CliRunner().invoke(cli, ["classify", str(ckpt), "--device", "cpu"])
    lean = {row["latent"]: row["rel_norm_B_over_A"] or 0.0 for row in map(json.loads, result.stdout.splitlines())}
    crosscoder = cc.load(ckpt)
    with torch.no_grad():
        fires = crosscoder.encode({n: torch.from_numpy(store.read(n, 0, store.n_tokens)) for n in store.names}) > 0
    is_planted = torch.from_numpy(np.isin(store.aligned_arrays()["aligned/words/tokens"], ids))
    hits = (fires & is_planted[:, None]).sum(0).double()
    f1 = 2 * hits / (fires.sum(0) + is_planted.sum())
    best = int(f1.argmax())
    assert f1[best] > 0.85  # one latent finds the planted rows
    # and it leans to B: its decoder is larger in B, more than three quarters of the latents' decoders
    assert lean[best] > 0.5 and lean[best] > np.quantile(list(lean.values()), 0.75), (lean[best], sorted(lean.values()))


def test_document_windows_cut_at_common_boundaries_and_drop_spans_too_long():
    """'ab cd': model A reads 'ab', ' cd'; model B reads 'a', 'b', ' c', 'd'. Common boundaries: 2 and 5."""
    a = (np.array([10, 11]), np.array([[0, 2], [2, 5]]))
    b = (np.array([20, 21, 22, 23]), np.array([[0, 1], [1, 2], [3, 4], [4, 5]]))
    no_special = [set(), set()]
    one, = align.document_windows(7, "ab cd", [a, b], [2, 4], no_special)  # everything fits one window
    assert (one.document, one.first, one.last) == (7, [0, 0], [1, 3])
    assert one.row_starts.tolist() == [0, 2] and one.row_ends.tolist() == [2, 5]
    assert one.row_tokens.tolist() == [[0, 1], [1, 3]] and one.one_to_one.tolist() == [False, False]
    first, second = align.document_windows(7, "ab cd", [a, b], [1, 2], no_special)  # a span per window
    assert (first.first, first.last, second.first, second.last) == ([0, 0], [0, 1], [1, 2], [1, 3])
    assert second.first_of_document is False and second.row_ends.tolist() == [5]
    empty, = align.document_windows(7, "ab cd", [a, b], [1, 1], no_special)  # B's spans are 2 tokens
    assert empty.n_rows == 0 and empty.first_of_document and empty.text_length == 5
    special, = align.document_windows(7, "ab cd", [a, b], [2, 4], [{11}, set()])  # ' cd' spells a special token
    assert special.row_ends.tolist() == [2] and special.last == [1, 3]  # read as context, no row
