"""xc amplify: logit diff amplification and latent steering, on tiny offline models."""

import functools
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from xcli.cli import cli
from xcli.crosscoder.model import Crosscoder, save
from xcli.errors import BadInput
from xcli.lm import amplify as amp
from xcli.lm.config import ModelSpec
from xcli.lm.models import quiet_transformers
from xcli.lm.sites import hook_input, hook_output, resolve_site
from xcli.source import Source

PROMPTS = ("the cat sees", "a big red dog walks on the road", "one")
STOP_WORD = "two"  # an extra EOS, so that completions end at different steps


def load(path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def varied(tiny, tmp_path_factory):
    """Two GPT-2s with larger random weights, so that greedy outputs vary and differ between them,
    and with EOS ids {</s>, "two"}, so that some completions stop early."""
    root = tmp_path_factory.mktemp("varied")
    tok = tokenizer(tiny["gpt2"])
    paths = {}
    for name, source, seed in (("before", "gpt2_b", 2), ("after", "gpt2", 1)):
        model = load(tiny[source])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(STOP_WORD)]
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def run_amplify(varied, alphas, prompts=PROMPTS, **sampling):
    cfg = amp.AmplifyConfig(str(varied["before"]), str(varied["after"]), tuple(alphas), prompts,
                            amp.Sampling(**sampling), token_ids=True)
    return list(amp.amplify(cfg))


@functools.lru_cache(maxsize=4)
def load_for_generate(path):
    return load(path), tokenizer(path)


def greedy_generate(path, prompt, n):
    model, tok = load_for_generate(path)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc.input_ids.shape[1]:].tolist()


# -- amplification -------------------------------------------------------------------------------

def test_alpha_0_and_minus_1_reproduce_plain_greedy_generate(varied):
    # Three prompts of different lengths in batches of 2 (left padding), alphas mixed within a batch.
    records = run_amplify(varied, [0, -1, 2], max_new_tokens=12, temperature=0, batch_size=2)
    assert len(records) == 9
    for alpha, name in ((0.0, "after"), (-1.0, "before")):
        for i, prompt in enumerate(PROMPTS):
            record = next(r for r in records if r["alpha"] == alpha and r["prompt_index"] == i)
            expected = greedy_generate(varied[name], prompt, 12)
            assert record["token_ids"] == expected, (alpha, prompt)
            assert record["n_tokens"] == len(expected)
    finishes = {r["finish"] for r in records}
    assert finishes == {"eos", "length"}, "the fixture must exercise both stopping rules"


def test_amplified_sequence_matches_a_brute_force_loop_without_cache(varied):
    """Greedy alpha = 2 against recomputing both models on the whole prefix at every step."""
    alpha, n = 2.0, 10
    records = run_amplify(varied, [alpha], max_new_tokens=n, temperature=0, batch_size=3)
    before, after, tok = load(varied["before"]), load(varied["after"]), tokenizer(varied["after"])
    eos = set(after.generation_config.eos_token_id)
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(n):
                x = torch.tensor([ids + generated])
                a, b = after(x).logits[0, -1].double(), before(x).logits[0, -1].double()
                generated.append(int(torch.argmax(a + alpha * (a - b))))
                if generated[-1] in eos:
                    break
        assert records[i]["token_ids"] == generated
        assert records[i]["completion"] == tok.decode([t for t in generated if t not in eos],
                                                      skip_special_tokens=True)


def test_sampling_is_seeded_and_independent_of_batch_size(varied):
    common = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, n_samples=2, seed=7)
    one = run_amplify(varied, [0, 1.5], PROMPTS[:2], batch_size=1, **common)
    many = run_amplify(varied, [0, 1.5], PROMPTS[:2], batch_size=7, **common)
    assert one == many
    assert len({tuple(r["token_ids"]) for r in one}) > len(one) // 2  # samples do differ
    other_seed = run_amplify(varied, [0, 1.5], PROMPTS[:2], batch_size=7, **{**common, "seed": 8})
    assert [r["token_ids"] for r in other_seed] != [r["token_ids"] for r in one]


def test_choose_tokens_is_inverse_cdf_over_the_top_p_nucleus():
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, generator=g) * 2
    temperature, top_p, n = 0.7, 0.8, 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # an even grid of uniforms
    for row in range(2):
        chosen = amp.choose_tokens(logits[row].expand(n, -1), temperature, top_p, u)
        freq = torch.bincount(chosen, minlength=9).double() / n
        # Independent reference: transformers' own top-p filter, then renormalise.
        warped = TopPLogitsWarper(top_p)(None, (logits[row:row + 1] / temperature).double())
        expected = torch.softmax(warped, dim=-1)[0]
        assert torch.equal(freq > 0, expected > 0)
        assert torch.allclose(freq, expected, atol=2 / n)
    assert torch.equal(amp.choose_tokens(logits, 0.0, 0.5, torch.zeros(2)), logits.argmax(-1))


def test_wilson_interval_known_values_and_score_test_inversion():
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no continuity correction).
    for (k, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = amp.wilson_interval(k, n)
        assert got[0] == pytest.approx(low, abs=5e-5) and got[1] == pytest.approx(high, abs=5e-5)
    # Brute force: the interval is the set of p the score test does not reject at 5%.
    for k, n in ((0, 5), (3, 10), (7, 7), (40, 100)):
        grid = [i / 100000 for i in range(100001)]
        accepted = [p for p in grid if abs(k / n - p) <= amp.Z95 * math.sqrt(p * (1 - p) / n)]
        low, high = amp.wilson_interval(k, n)
        assert low == pytest.approx(min(accepted), abs=2e-5) and high == pytest.approx(max(accepted), abs=2e-5)


@pytest.fixture(scope="module")
def planted(varied, tmp_path_factory):
    """An after-model that says "queen" a little more often than its before-model."""
    root = tmp_path_factory.mktemp("planted")
    model, tok = load(varied["before"]), tokenizer(varied["before"])
    queen = model.transformer.wte.weight[tok.convert_tokens_to_ids("queen")].detach()
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(queen / queen.norm() ** 2 * 1.5)  # +1.5 on the queen logit
    model.save_pretrained(root / "after")
    tok.save_pretrained(root / "after")
    return {"before": varied["before"], "after": root / "after"}


def test_count_rate_rises_with_alpha_for_a_planted_behaviour(planted):
    cfg = amp.AmplifyConfig(str(planted["before"]), str(planted["after"]), (-1.0, 0.0, 4.0), PROMPTS[:2],
                            amp.Sampling(max_new_tokens=4, n_samples=20, batch_size=64), count=r"\bqueen\b")
    records = list(amp.amplify(cfg))
    summaries = {r["alpha"]: r for r in records if r["kind"] == "count"}
    for alpha, s in summaries.items():
        lines = [r for r in records if r["kind"] == "completion" and r["alpha"] == alpha]
        assert s["n"] == len(lines) == 40
        assert s["matches"] == sum(r["match"] for r in lines) == sum("queen" in r["completion"].split()
                                                                     for r in lines)
        assert s["ci95"] == list(amp.wilson_interval(s["matches"], s["n"]))
    assert summaries[-1.0]["rate"] < summaries[0.0]["rate"] < summaries[4.0]["rate"]
    assert [r["kind"] for r in records[-3:]] == ["count"] * 3


# -- sites and steering --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_sites_are_the_models_own_hidden_states(tiny, family):
    model, tok = load(tiny[family]), tokenizer(tiny[family])
    seen = {}
    handles = []
    for layer in (0, 1, 2):
        for site in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
            where = resolve_site(model, site, layer)
            key = (site, layer)
            if where.catch_input:
                handles.append(where.module.register_forward_pre_hook(
                    lambda m, a, k, key=key: seen.__setitem__(key, hook_input(a, k)),
                    with_kwargs=True))
            else:
                handles.append(where.module.register_forward_hook(
                    lambda m, a, o, key=key: seen.__setitem__(key, hook_output(o))))
    with torch.no_grad():
        hidden = model(**tok(["the cat sees a dog"], return_tensors="pt"), output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    for layer in (0, 1, 2):
        assert torch.allclose(seen[("resid_pre", layer)], hidden[layer])
        if layer < 2:  # HF applies the final norm to the last hidden state; the site is the block output
            assert torch.allclose(seen[("resid_post", layer)], hidden[layer + 1])
        assert seen[("mlp_out", layer)].shape == seen[("attn_out", layer)].shape == hidden[0].shape
    with pytest.raises(BadInput, match="layers 0-2"):
        resolve_site(model, "resid_post", 3)


def checkpoint(path, sources, F=12, arch="relu", scales=None, orthonormal=False, k=None, seed=0):
    cc = Crosscoder(sources, F, arch, k)
    cc.init_weights(torch.Generator().manual_seed(seed), decoder_norm=0.5)
    with torch.no_grad():
        for i, s in enumerate(sources):
            cc.input_scale[i] = (scales or {}).get(s.name, 0.5 + i)
        if orthonormal:  # unit decoder rows, orthogonal; encoder = decoder^T; every latent active
            for s in sources:
                q, _ = torch.linalg.qr(torch.randn(s.d, F, generator=torch.Generator().manual_seed(seed)))
                cc.decoder_weight(s.name).copy_(q.T)
                cc.encoder_weight(s.name).copy_(q)
            cc.b_enc.fill_(20.0)
    save(cc, path)
    return cc


def gpt2_sources(d=32, model="m"):
    return [Source(f"{model}.mlp_out.0", model, "mlp_out", 0, d), Source(f"{model}.resid_post.1", model,
            "resid_post", 1, d), Source(f"{model}.resid_pre.2", model, "resid_pre", 2, d)]


def test_scale_adds_exactly_S_times_decoder_row_over_input_scale_at_each_site(tiny, tmp_path):
    sources = gpt2_sources() + [Source("other.resid_post.1", "other", "resid_post", 1, 32)]
    cc = checkpoint(tmp_path / "x.safetensors", sources)
    model, tok = load(tiny["gpt2"]), tokenizer(tiny["gpt2"])
    mine = amp.sources_of_model(cc, ModelSpec.parse(f"m={tiny['gpt2']}"), "m=...")
    assert [s.name for s in mine] == [s.name for s in sources[:3]]
    latents, values = [3, 7], torch.tensor([0.0, 2.5, -4.0])
    steering = amp.Steering(model, cc, mine, latents, "scale")
    deltas = {}

    def record(name, site, phase):
        def grab(hidden):
            deltas.setdefault(name, {})[phase] = hidden.clone()
        if site.catch_input:
            return site.module.register_forward_pre_hook(
                lambda m, a, k: grab(hook_input(a, k)), with_kwargs=True)
        return site.module.register_forward_hook(lambda m, a, o: grab(hook_output(o)))

    sites = {s.name: resolve_site(model, s.site, s.layer) for s in mine}
    handles = [record(n, site, "in") for n, site in sites.items()]  # runs before the steering hooks
    enc = tok(["the cat sees a dog"] * 3, return_tensors="pt")
    with steering, torch.no_grad():
        handles += [record(n, site, "out") for n, site in sites.items()]  # runs after them
        steering.values = values
        model(**enc)
    for h in handles:
        h.remove()
    for s in mine:
        d = sum(cc.decoder_weight(s.name)[i] for i in latents).detach() / cc.scale(s.name)
        got = deltas[s.name]["out"] - deltas[s.name]["in"]
        assert torch.allclose(got, values[:, None, None] * d, atol=1e-5), s.name
    assert not steering._handles  # hooks removed on exit


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_clamp_sets_the_latent_to_V_when_reencoded(tiny, tmp_path, arch):
    sources = [Source("m.resid_post.1", "m", "resid_post", 1, 32)]
    cc = checkpoint(tmp_path / "x.safetensors", sources, F=8, orthonormal=True, scales={"m.resid_post.1": 0.3},
                    arch=arch)
    model, tok = load(tiny["gpt2"]), tokenizer(tiny["gpt2"])
    steering = amp.Steering(model, cc, sources, [5], "clamp")
    after = {}
    block = resolve_site(model, "resid_post", 1).module
    enc = tok(["the cat sees a dog", "one two"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = cc.encode({sources[0].name: model(**enc, output_hidden_states=True).hidden_states[2]})
        with steering:
            handle = block.register_forward_hook(lambda m, a, o: after.__setitem__("x", o.clone()))
            steering.values = torch.tensor([0.0, 3.0])
            model(**enc)
        handle.remove()
        f = cc.encode({sources[0].name: after["x"]})
    assert torch.allclose(f[0, :, 5], torch.zeros(f.shape[1]), atol=1e-3)
    assert torch.allclose(f[1, :, 5], torch.full((f.shape[1],), 3.0), atol=1e-3)
    others = [i for i in range(8) if i != 5]
    assert torch.allclose(f[..., others], plain[..., others], atol=1e-3)  # the other latents are untouched
    assert (plain[..., 5] > 5).all()  # the clamp did change something


def test_steering_scale_0_reproduces_generate_and_a_large_scale_changes_it(varied, tmp_path):
    cc_path = tmp_path / "x.safetensors"
    checkpoint(cc_path, gpt2_sources(model="after"))
    cfg = amp.SteerConfig(f"after={varied['after']}", str(cc_path), (2,), PROMPTS, scales=(0.0, 40.0),
                          sampling=amp.Sampling(max_new_tokens=10, temperature=0, batch_size=4), token_ids=True)
    records = list(amp.steer(cfg))
    for i, prompt in enumerate(PROMPTS):
        assert records[i]["scale"] == 0.0 and records[i]["latents"] == [2]
        assert records[i]["token_ids"] == greedy_generate(varied["after"], prompt, 10)
    assert [r["token_ids"] for r in records[3:]] != [r["token_ids"] for r in records[:3]]


def test_clamp_refuses_checkpoints_it_cannot_encode(tiny, tmp_path):
    model = load(tiny["gpt2"])
    two_models = [Source("m.resid_post.1", "m", "resid_post", 1, 32),
                  Source("o.resid_post.1", "o", "resid_post", 1, 32)]
    cc = checkpoint(tmp_path / "a.safetensors", two_models)
    with pytest.raises(BadInput, match="another model; use --scale"):
        amp.Steering(model, cc, two_models[:1], [0], "clamp")
    # A source read at layer 2 but written at layer 0: the write happens before the read is known.
    late = [Source("m.resid_post.0", "m", "resid_post", 0, 32), Source("m.resid_post.2", "m", "resid_post", 2, 32)]
    cc = Crosscoder(late, 8, "relu", read=["m.resid_post.2"], write=["m.resid_post.0"])
    steering = amp.Steering(model, cc, late, [0], "clamp")
    with steering, pytest.raises(BadInput, match="comes later in the forward pass"):
        steering.values = torch.zeros(1)
        model(torch.tensor([[2, 8, 9]]))


# -- the command line: refusals and one end-to-end run -------------------------------------------

def cli_run(args):
    return CliRunner().invoke(cli, ["amplify", *map(str, args)])


def assert_refused(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_refuses_different_tokenizers(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny["gpt2_b"], other)
    tok = tokenizer(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    assert_refused(cli_run(["--before", other, "--after", tiny["gpt2"], "--alpha", 1, "--prompt", "the"]),
                   "different tokenizers")


def test_refuses_a_model_without_a_causal_lm_head(tiny):
    assert_refused(cli_run(["--before", tiny["bert"], "--after", tiny["gpt2"], "--alpha", 1, "--prompt", "the"]),
                   "BertForMaskedLM", "no causal language-model head")


def test_refuses_a_hub_id_that_is_not_local_without_touching_the_network(tiny, monkeypatch):
    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    result = cli_run(["--before", "xc-test/no-such-model", "--after", tiny["gpt2"], "--alpha", 1, "--prompt", "a"])
    assert_refused(result, "xc-test/no-such-model", "not in the local Hugging Face cache", "no network")
    assert attempts == []


def test_refuses_checkpoint_of_another_model_and_bad_latent(tiny, tmp_path):
    path = tmp_path / "x.safetensors"
    checkpoint(path, gpt2_sources(model="base"))
    common = ["--checkpoint", path, "--prompt", "the cat", "--scale", 1]
    assert_refused(cli_run(["--model", f"chat={tiny['gpt2']}", "--latent", 0, *common]),
                   "matches none of the checkpoint's sources", "'base'")
    assert_refused(cli_run(["--model", tiny["gpt2"], "--latent", 0, *common]), "matches none")
    assert_refused(cli_run(["--model", f"base={tiny['gpt2']}", "--latent", 12, *common]),
                   "--latent 12 is out of range", "12 latents (0-11)")


@pytest.mark.parametrize("args,fragment", [
    (["--alpha", 1, "--prompt", "a"], "give --before MODEL and --after MODEL"),
    (["--before", "x", "--after", "y", "--alpha", 1, "--model", "z", "--prompt", "a"], "separate modes"),
    (["--before", "x", "--after", "y", "--prompt", "a"], "at least one --alpha"),
    (["--before", "x", "--after", "y", "--alpha", 1], "no prompts"),
    (["--before", "x", "--after", "y", "--alpha", 1, "--prompt", "a", "--top-p", 0], "--top-p 0.0"),
    (["--before", "x", "--after", "y", "--alpha", 1, "--prompt", "a", "--count", "("], "not a valid regular"),
    (["--before", "x", "--after", "y", "--alpha", 1, "--prompts", "/no/such/file"], "--prompts '/no/such/file'"),
    (["--model", "x", "--checkpoint", "c", "--latent", 1, "--scale", 1, "--clamp", 2, "--prompt", "a"],
     "either --scale or --clamp"),
])
def test_refuses_bad_options_before_loading_anything(args, fragment):
    assert_refused(cli_run(args), fragment)


def test_prompts_that_are_not_utf8_are_refused(tmp_path):
    bad = "caf\xe9 au lait\n".encode("latin-1")
    (tmp_path / "p.txt").write_bytes(bad)
    common = ["amplify", "--before", "x", "--after", "y", "--alpha", "1", "--prompts"]
    from_file = CliRunner().invoke(cli, [*common, str(tmp_path / "p.txt")])
    assert_refused(from_file, "--prompts", "is not UTF-8 text (byte 3 is 0xe9)")
    from_stdin = CliRunner().invoke(cli, [*common, "-"], input=bad)
    assert_refused(from_stdin, "--prompts - (stdin) is not UTF-8 text")


def test_cli_runs_from_the_local_hugging_face_cache(tiny, tmp_path):
    """A hub id resolves offline through the local cache; JSON on stdout, count summary on stderr."""
    snapshot = tmp_path / "hub" / "models--xc-test--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny["gpt2"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "xcli", "amplify", "--before", str(tiny["gpt2_b"]),
                           "--after", "xc-test/tiny-gpt2", "--alpha", "-1", "--alpha", "2", "--prompts", "-",
                           "--n-samples", "2", "--max-new-tokens", "3", "--count", "cat"],
                          input="the cat\n\n", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["kind"], r["alpha"]) for r in lines] == [("completion", -1.0)] * 2 + [("completion", 2.0)] * 2 + \
        [("count", -1.0), ("count", 2.0)]
    assert {r["prompt"] for r in lines if r["kind"] == "completion"} == {"the cat"}  # blank line skipped
    assert proc.stderr.count("xc: count /cat/ alpha=") == 2


def test_quiet_amplify_prints_nothing_on_stderr(tiny):
    """Not even a transformers deprecation warning: the KV cache is passed by the name the installed
    transformers expects (`cache` in 5.x, `past_key_values` before)."""
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "xcli", "amplify", "--before", str(tiny["gpt2_b"]),
                           "--after", str(tiny["gpt2"]), "--alpha", "2", "--prompt", "the cat", "--n-samples", "2",
                           "--max-new-tokens", "4", "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert len(proc.stdout.splitlines()) == 2


def test_steering_with_a_dedicated_latent_moves_only_its_own_model(varied, tmp_path):
    """A DFC checkpoint (xc train --exclusive): a latent dedicated to "before" has no decoder in "after",
    so steering "after" with it changes nothing; a latent dedicated to "after" steers it."""
    from xcli.crosscoder.partition import Partition

    sources = gpt2_sources(model="before") + gpt2_sources(model="after")
    cc = Crosscoder(sources, 12, "relu")
    cc.init_weights(torch.Generator().manual_seed(0), decoder_norm=0.5)
    cc.partition = Partition.layout(2, {"before": 2, "after": 2})
    cc.partition.enforce(cc)
    save(cc, tmp_path / "x.safetensors")

    def steer(latent):
        cfg = amp.SteerConfig(f"after={varied['after']}", str(tmp_path / "x.safetensors"), (latent,), PROMPTS,
                              scales=(0.0, 40.0), sampling=amp.Sampling(max_new_tokens=10, temperature=0,
                                                                        batch_size=4), token_ids=True)
        records = list(amp.steer(cfg))
        return [r["token_ids"] for r in records[:3]], [r["token_ids"] for r in records[3:]]

    plain, steered = steer(2)  # dedicated to "before"
    assert steered == plain
    plain, steered = steer(4)  # dedicated to "after"
    assert steered != plain


# -- models with different tokenizers (a crosscoder of xc harvest --align) -------------------------------

ALIGNED_PROMPTS = ("Zürich's café serves", "the king and the queen", "東京 and")


@pytest.fixture(scope="module")
def aligned_pair(tmp_path_factory):
    """A byte-level BPE GPT-2 32 wide and a word-level Llama 24 wide, and a crosscoder reading and writing both."""
    import tiny_models

    root = tmp_path_factory.mktemp("aligned_pair")
    texts = list(tiny_models.ALIGNED_TEXT) + tiny_models.aligned_corpus(50) + [" ".join(tiny_models.WORDS)]
    bpe = tiny_models.build_byte_level_tokenizer(root / "bpe_tok", texts, vocab_size=400)
    words = tiny_models.build_word_level_tokenizer(root / "words_tok", texts)
    paths = {"bpe": tiny_models.build_model("gpt2", root / "bpe", bpe, hidden=32),
             "words": tiny_models.build_model("llama", root / "words", words, hidden=24)}
    sources = [Source("bpe.resid_post.1", "bpe", "resid_post", 1, 32),
               Source("words.resid_post.1", "words", "resid_post", 1, 24)]
    checkpoint(root / "x.safetensors", sources, scales={"bpe.resid_post.1": 0.5, "words.resid_post.1": 0.5})
    return {**paths, "checkpoint": root / "x.safetensors"}


@pytest.mark.parametrize("name", ["bpe", "words"])
def test_steering_each_model_of_an_aligned_crosscoder_uses_its_own_tokenizer(aligned_pair, name):
    cfg = amp.SteerConfig(f"{name}={aligned_pair[name]}", str(aligned_pair["checkpoint"]), (3,), ALIGNED_PROMPTS,
                          scales=(0.0, 40.0), sampling=amp.Sampling(max_new_tokens=8, temperature=0, batch_size=4),
                          token_ids=True)
    records = list(amp.steer(cfg))
    own = tokenizer(aligned_pair[name])
    for i, prompt in enumerate(ALIGNED_PROMPTS):
        assert records[i]["token_ids"] == greedy_generate(aligned_pair[name], prompt, 8)
        assert max(records[i]["token_ids"]) < len(own)  # ids of this model's own vocabulary
    assert [r["token_ids"] for r in records[3:]] != [r["token_ids"] for r in records[:3]]
    # --clamp must encode the activations of both models at once: one model alone cannot.
    result = cli_run(["--model", f"{name}={aligned_pair[name]}", "--checkpoint", aligned_pair["checkpoint"],
                      "--latent", 3, "--clamp", 1, "--prompt", "the king", "--max-new-tokens", 4])
    assert_refused(result, "another model; use --scale")


def test_amplification_refuses_models_with_different_tokenizers_and_says_why(aligned_pair):
    result = cli_run(["--before", aligned_pair["bpe"], "--after", aligned_pair["words"], "--alpha", 1,
                      "--prompt", "the king"])
    assert_refused(result, "different tokenizers", "token by token", "--model, --checkpoint, --latent")
