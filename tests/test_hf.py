"""The Hugging Face GPT-2 bridge against transformers' PyTorch GPT2LMHeadModel.

Tiny random GPT-2s are built with torch and saved with `save_pretrained`, then loaded through
the same code path a hub name takes after download (the hub itself is unreachable here; the hub
branch is exercised with a stand-in for `huggingface_hub.snapshot_download`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cleangpt_jax.config import ConfigError, ModelConfig
from cleangpt_jax.hf import config_from_hf, export_gpt2, load_gpt2
from cleangpt_jax.models import get_model
from cleangpt_jax.tokenizers import CharacterTokenizer, GPT2Tokenizer, load_tokenizer
from helpers import QUIET_RUN, run_tool, xla_flags

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

VOCAB, N_POS, N_EMBD, N_LAYER, N_HEAD = 300, 64, 32, 2, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def random_gpt2(activation="gelu_new", *, tie=True, seed=0) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel whose every tensor (LayerNorms and biases too) is random."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=N_POS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        activation_function=activation, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def input_ids(batch=2, length=N_POS, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def hf_forward(model, ids):
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def our_forward(config, params, ids):
    out = get_model(config=config).apply({"params": params}, jnp.asarray(ids),
                                         output_hidden_states=True)
    return np.asarray(out.logits), [np.asarray(h) for h in out.hidden_states]


def flat(params):
    return flax.traverse_util.flatten_dict(params, sep="/")


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """{activation: (torch model, save_pretrained directory)} for tanh and exact GELU."""
    out = {}
    for act in ("gelu_new", "gelu"):
        model = random_gpt2(act, seed=len(out))
        directory = str(tmp_path_factory.mktemp(f"hf_{act}"))
        model.save_pretrained(directory)
        out[act] = model, directory
    return out


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("activation, ours", [("gelu_new", "gelu_tanh"), ("gelu", "gelu")])
def test_load_matches_transformers_logits_and_hidden_states(gpt2_dirs, activation, ours):
    torch_model, directory = gpt2_dirs[activation]
    config, params = load_gpt2(directory)
    assert config == ModelConfig(model_type="vanilla", n_layer=N_LAYER, n_head=N_HEAD,
                                 n_embd=N_EMBD, block_size=N_POS, vocab_size=VOCAB, dropout=0.1,
                                 bias=True, activation=ours, layer_norm_epsilon=1e-5)
    ids = input_ids()
    hf_logits, hf_hidden = hf_forward(torch_model, ids)
    logits, hidden = our_forward(config, params, ids)
    np.testing.assert_allclose(logits, hf_logits, **TOL)
    assert len(hidden) == len(hf_hidden) == N_LAYER + 1
    for i in range(N_LAYER):  # pre-ln_f on both sides
        np.testing.assert_allclose(hidden[i], hf_hidden[i], **TOL)
    # HF's last entry is after ln_f; ours is before it.
    model = get_model(config=config)
    last = model.apply({"params": params}, jnp.asarray(hidden[-1]),
                       method=lambda m, h: m.ln_f(h))
    np.testing.assert_allclose(np.asarray(last), hf_hidden[-1], **TOL)
    assert not np.allclose(hidden[-1], hf_hidden[-1], atol=1e-3)


@pytest.mark.parametrize("activation, ours", [
    ("gelu_python", "gelu"), ("gelu_python_tanh", "gelu_tanh"), ("gelu_accurate", "gelu_tanh")])
def test_every_gelu_spelling_and_a_common_dropout_are_imported(activation, ours):
    """HF's exact and tanh GELUs under their other names; equal attn/resid/embd dropouts become
    our one dropout."""
    hf = transformers.GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD).to_dict()
    hf.update(activation_function=activation, attn_pdrop=0.25, resid_pdrop=0.25, embd_pdrop=0.25)
    config = config_from_hf(hf)
    assert (config.activation, config.dropout) == (ours, 0.25)


def test_pytorch_bin_in_hub_layout(tmp_path):
    """pytorch_model.bin as the hub's `gpt2` stores it: no "transformer." prefix, the attn.bias /
    attn.masked_bias buffers, and a (tied) lm_head.weight."""
    torch_model = random_gpt2("gelu_new", seed=3)
    state = {k.removeprefix("transformer."): v for k, v in torch_model.state_dict().items()}
    for i in range(N_LAYER):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = torch_model.lm_head.weight.detach().clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch_model.config.to_json_file(tmp_path / "config.json")

    config, params = load_gpt2(str(tmp_path))
    ids = input_ids(seed=1)
    np.testing.assert_allclose(our_forward(config, params, ids)[0], hf_forward(torch_model, ids)[0],
                               **TOL)


def test_sharded_safetensors_follow_the_index(gpt2_dirs, tmp_path):
    """Big checkpoints come as model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.numpy import load_file, save_file

    torch_model, src = gpt2_dirs["gelu"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    config, params = load_gpt2(str(tmp_path))
    _, ref = load_gpt2(src)
    for path, x in flat(ref).items():
        np.testing.assert_array_equal(np.asarray(flat(params)[path]), np.asarray(x), err_msg=path)


def test_untied_head_loads_and_exports(tmp_path):
    torch_model = random_gpt2("gelu_new", tie=False, seed=4)
    torch_model.save_pretrained(tmp_path / "in")
    config, params = load_gpt2(str(tmp_path / "in"))
    assert not config.tie_embeddings and set(params) >= {"lm_head", "wte"}
    ids = input_ids(seed=2)
    hf_logits = hf_forward(torch_model, ids)[0]
    np.testing.assert_allclose(our_forward(config, params, ids)[0], hf_logits, **TOL)

    export_gpt2(config, params, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert not reloaded.config.tie_word_embeddings
    np.testing.assert_allclose(hf_forward(reloaded, ids)[0], hf_logits, **TOL)


def test_dtype_converts_every_tensor(gpt2_dirs):
    config, params = load_gpt2(gpt2_dirs["gelu_new"][1], dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    _, ref = load_gpt2(gpt2_dirs["gelu_new"][1])
    for path, x in flat(params).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat(ref)[path], jnp.bfloat16))


# ----------------------------------------------------------------------------- export

def random_vanilla(**overrides) -> tuple[ModelConfig, dict]:
    """A Vanilla model with every parameter random (so a misplaced bias or scale shows)."""
    config = ModelConfig(**{**dict(model_type="vanilla", n_layer=N_LAYER, n_head=N_HEAD,
                                   n_embd=N_EMBD, block_size=32, vocab_size=VOCAB), **overrides})
    params = get_model(config=config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return config, jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("overrides", [
    dict(bias=True, activation="gelu_tanh"),
    dict(bias=False, activation="gelu"),
], ids=["bias-gelu_tanh", "nobias-gelu"])
def test_export_loads_in_transformers_with_our_logits(tmp_path, overrides):
    config, params = random_vanilla(**overrides)
    export_gpt2(config, params, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch_model.config.activation_function == {"gelu_tanh": "gelu_new",
                                                      "gelu": "gelu"}[config.activation]
    ids = input_ids(length=32, seed=5)
    logits = our_forward(config, params, ids)[0]
    np.testing.assert_allclose(hf_forward(torch_model, ids)[0], logits, **TOL)
    if not config.bias:  # the biases GPT-2 needs are zeros, LayerNorm biases included
        for name, p in torch_model.named_parameters():
            if name.endswith(".bias"):
                assert not p.detach().abs().max(), name
    back_config, back = load_gpt2(str(tmp_path))  # and it loads back as a bias=True model
    np.testing.assert_allclose(our_forward(back_config, back, ids)[0], logits, **TOL)


def test_load_export_load_is_identity(gpt2_dirs, tmp_path):
    config, params = load_gpt2(gpt2_dirs["gelu"][1])
    export_gpt2(config, params, tmp_path)
    config2, params2 = load_gpt2(str(tmp_path))
    assert config2 == config
    a, b = flat(params), flat(params2)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(a[path]), err_msg=path)


def test_export_with_gpt2_tokenizer_loads_with_autotokenizer(gpt2_tokenizer_dir, tmp_path):
    tokenizer = GPT2Tokenizer(gpt2_tokenizer_dir)
    config, params = random_vanilla(bias=True, activation="gelu_tanh")
    export_gpt2(config, params, tmp_path, tokenizer=tokenizer)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox, to be or not to be."
    assert auto.encode(text) == tokenizer.encode(text)
    assert len(auto) == VOCAB
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["eos_token_id"] == saved["bos_token_id"] == tokenizer.eos_token_id == 0
    assert load_tokenizer(tmp_path).encode(text) == tokenizer.encode(text)


def test_export_character_tokenizer_loads_with_autotokenizer_and_ours(tmp_path):
    """Issue 13 item 24: AutoTokenizer failed on the export ("`vocab` and `merges` must be both
    be from memory or both filenames": config.json says GPT-2, vocab.json was ours)."""
    tokenizer = CharacterTokenizer.from_text("to be, or not to be: that is the question")
    config, params = random_vanilla(vocab_size=tokenizer.vocab_size)
    export_gpt2(config, params, tmp_path, tokenizer=tokenizer)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharacterTokenizer) and again.itos == tokenizer.itos
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path).config.vocab_size == \
        tokenizer.vocab_size
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(auto) == tokenizer.vocab_size
    assert (auto.unk_token_id, auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == \
        (0, 1, 2, 3)
    text = "to be\nor NOT, 2b?"  # unknown characters and a newline
    ids = tokenizer.encode(text)
    assert auto.encode(text, add_special_tokens=False) == ids and 0 in ids
    assert auto.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


# ----------------------------------------------------------------------------- the hub branch

class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: copies the files of a local "repo" that
    match allow_patterns into a fresh snapshot directory, and records every call."""

    def __init__(self, repo_dir, snapshot_root):
        self.repo_dir, self.root, self.calls = repo_dir, snapshot_root, []

    def __call__(self, repo_id, *, allow_patterns=None, **kwargs):
        self.calls.append((repo_id, list(allow_patterns)))
        dest = os.path.join(self.root, f"snapshot{len(self.calls)}")
        os.makedirs(dest)
        for name in os.listdir(self.repo_dir):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(os.path.join(self.repo_dir, name), dest)
        return dest


def test_hub_name_downloads_config_and_safetensors_only(gpt2_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    torch_model, src = gpt2_dirs["gelu_new"]
    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    (repo / "tf_model.h5").write_bytes(b"not needed")
    (repo / "flax_model.msgpack").write_bytes(b"not needed")
    fake = FakeHub(str(repo), str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    config, params = load_gpt2("someorg/tiny-gpt2")
    assert [c[0] for c in fake.calls] == ["someorg/tiny-gpt2"]
    assert sorted(os.listdir(tmp_path / "snapshot1")) == ["config.json", "model.safetensors"]
    ids = input_ids(seed=6)
    np.testing.assert_allclose(our_forward(config, params, ids)[0], hf_forward(torch_model, ids)[0],
                               **TOL)


def test_hub_repo_without_safetensors_falls_back_to_pytorch_bin(gpt2_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    torch_model, src = gpt2_dirs["gelu"]
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(src, "config.json"), repo)
    torch.save(torch_model.state_dict(), repo / "pytorch_model.bin")
    fake = FakeHub(str(repo), str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    config, params = load_gpt2("distilgpt2")
    assert len(fake.calls) == 2 and "pytorch_model.bin" in fake.calls[1][1]
    assert "pytorch_model.bin" not in fake.calls[0][1]
    ids = input_ids(seed=7)
    np.testing.assert_allclose(our_forward(config, params, ids)[0], hf_forward(torch_model, ids)[0],
                               **TOL)


def test_hub_failure_is_one_line(monkeypatch):
    """A hub that answers but fails the download (the unreachable hub is test_reliability's)."""
    import huggingface_hub

    from cleangpt_jax import hub

    monkeypatch.setattr(hub, "offline_reason", lambda: "")

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache.\nSecond line of detail.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match=r"could not fetch 'gpt2' from the Hugging Face hub") as e:
        load_gpt2("gpt2")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sharded load

def test_mesh_load_lands_sharded(gpt2_dirs, fast_compile):
    """On 8 forced host devices with fsdp=2, every tensor lands with the training layout
    (`sharding.state_shardings`) and the logits match the single-device load."""
    directory = gpt2_dirs["gelu_new"][1]
    ref_logits = our_forward(*load_gpt2(directory), input_ids(seed=8))[0]
    np.save(os.path.join(os.path.dirname(directory), "ref_logits.npy"), ref_logits)
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, flax
        from cleangpt_jax import hf, sharding
        from cleangpt_jax.models import get_model
        assert jax.device_count() == 8
        mesh = sharding.create_mesh(fsdp=2)
        config, params = hf.load_gpt2({directory!r}, mesh=mesh)
        want = sharding.state_shardings(params, mesh)
        got = jax.tree.map(lambda x: x.sharding, params)
        assert got == want, (got, want)
        kernel = params["h_0"]["attn"]["c_attn"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), kernel.sharding
        assert {{s.data.shape for s in kernel.addressable_shards}} == {{({N_EMBD}, {3 * N_EMBD // 2})}}
        ids = np.random.RandomState(8).randint(0, {VOCAB}, (2, {N_POS})).astype(np.int32)
        logits = get_model(config=config).apply({{"params": params}}, jnp.asarray(ids)).logits
        np.testing.assert_allclose(np.asarray(logits), np.load({os.path.join(os.path.dirname(directory), "ref_logits.npy")!r}), rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    env = dict(fast_compile, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- bad input

def checkpoint_with_config(gpt2_dirs, tmp_path, **changes):
    """The gelu_new checkpoint's weights next to its config.json with `changes` applied."""
    src = gpt2_dirs["gelu_new"][1]
    cfg = json.load(open(os.path.join(src, "config.json")))
    for key, value in changes.items():
        cfg[key] = value
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(src, "model.safetensors"), tmp_path / "model.safetensors")
    return str(tmp_path)


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub call fails the test: local-looking paths must never reach the network."""
    import huggingface_hub

    def forbidden(*args, **kwargs):
        raise AssertionError(f"snapshot_download called with {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)


def test_missing_directory_errors_without_a_hub_call(tmp_path, monkeypatch, no_hub):
    one_line_error(load_gpt2, str(tmp_path / "nope"), match=r"directory .*nope' not found")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    one_line_error(load_gpt2, "runs/teacher", match=r"directory 'runs/teacher' not found")
    one_line_error(load_gpt2, "./teacher", match=r"not found")
    one_line_error(load_gpt2, "~/surely/not/here/teacher", match=r"not found")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(load_gpt2, "file.txt", match=r"is a file")


def test_directory_without_weights_or_config(gpt2_dirs, tmp_path):
    src = gpt2_dirs["gelu_new"][1]
    (tmp_path / "a").mkdir()
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "a")
    one_line_error(load_gpt2, str(tmp_path / "a"), match=r"no weights in .*model\.safetensors")
    (tmp_path / "b").mkdir()
    shutil.copy(os.path.join(src, "model.safetensors"), tmp_path / "b")
    one_line_error(load_gpt2, str(tmp_path / "b"), match=r"no config\.json in")


def test_llama_config_is_refused(tmp_path):
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    (tmp_path / "model.safetensors").write_bytes(b"")
    one_line_error(load_gpt2, str(tmp_path), match=r"'llama' model, not GPT-2")


@pytest.mark.parametrize("changes, match", [
    (dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx=True"),
    (dict(scale_attn_weights=False), r"scale_attn_weights=False"),
    (dict(n_inner=100), r"n_inner=100"),
    (dict(activation_function="relu"), r"activation_function='relu'"),
    (dict(n_embd=64), r"tensor 'transformer.h.0.attn.c_attn.bias' has shape \(96,\) but "
                      r"config.json implies \(192,\)"),
    (dict(n_layer=1), r"unexpected tensor 'transformer.h.1.*n_layer=1"),
    (dict(n_layer=3), r"lacks 12 tensor\(s\) .*transformer.h.2.ln_1.weight"),
    (dict(n_head=5), r"not divisible by model.n_head=5"),
    (dict(attn_pdrop=0.3, resid_pdrop=0.0), r"sets attn_pdrop=0\.3, resid_pdrop=0\.0, "
     r"embd_pdrop=0\.1, but the Vanilla model has one dropout rate: give the three one value "
     r"there to load it$"),
], ids=["inverse_layer_idx", "unscaled", "n_inner", "relu", "shape", "extra", "missing",
        "heads", "dropouts"])
def test_configs_that_do_not_fit_are_refused(gpt2_dirs, tmp_path, changes, match):
    one_line_error(load_gpt2, checkpoint_with_config(gpt2_dirs, tmp_path / "ckpt", **changes),
                   match=match)


def test_export_refusals(gpt2_tokenizer_dir, tmp_path):
    config, params = random_vanilla()
    one_line_error(export_gpt2, config, params, tmp_path / "a",
                   tokenizer=CharacterTokenizer.from_text("abc"),
                   match=r"tokenizer vocab_size 7 != model vocab_size 300")
    for model_type in ("sasp", "factored"):
        other = config.replace(model_type=model_type)
        other_params = get_model(config=other).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        one_line_error(export_gpt2, other, other_params["params"], tmp_path / "a",
                       match=rf"cannot export a '{model_type}' model as GPT-2")
    alibi = config.replace(position_encoding="alibi", max_position_embeddings=None)
    one_line_error(export_gpt2, alibi, params, tmp_path / "a", match=r"position_encoding='alibi'")
    one_line_error(export_gpt2, config.replace(n_embd=64), params, tmp_path / "a",
                   match=r"param 'h_0/attn/c_attn/kernel' has shape \(32, 96\) but the model "
                         r"config implies \(64, 192\)")
    one_line_error(export_gpt2, config.replace(bias=True), params, tmp_path / "a",
                   match=r"params lack 'h_0/attn/c_attn/bias'")
    assert not (tmp_path / "a").exists()  # nothing was written by a refused export
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("precious")
    one_line_error(export_gpt2, config, params, tmp_path / "b", match=r"is not empty")
    assert (tmp_path / "b" / "config.json").read_text() == "precious"
    export_gpt2(config, params, tmp_path / "b", overwrite=True)
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "b").config.n_embd == N_EMBD


# ----------------------------------------------------------------------------- the CLIs

def run_cli(module, *args, capsys, monkeypatch):
    """`python -m cleangpt_jax.<module> args` in-process (`run_tool`): (exit code, stdout,
    stderr)."""
    import importlib

    run = importlib.import_module(f"cleangpt_jax.{module}").run
    return run_tool(run, [module, *args], capsys, monkeypatch)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A GPT-2-compatible Vanilla (bias, tanh GELU) trained for a few steps on two plays."""
    from cleangpt_jax.config import get_config
    from cleangpt_jax.trainer import train_and_evaluate

    root = tmp_path_factory.mktemp("trained")
    cfg = get_config()
    cfg.model.update(dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True,
                          activation="gelu_tanh"))
    cfg.data.max_samples = 2
    cfg.data.cache_dir = str(root / "cache")
    cfg.train.update(dict(num_steps=3, batch_size=4, warmup_steps=1, eval_every=0, log_every=1,
                          checkpoint_every=3, sample_max_new_tokens=0))
    cfg.update_from_flattened_dict(QUIET_RUN)
    train_and_evaluate(cfg, str(root / "run"))
    return str(root / "run")


def test_export_and_import_clis_round_trip_a_trained_run(trained_run, tmp_path, capsys,
                                                         monkeypatch):
    from cleangpt_jax.workdir import load_run

    run = load_run(trained_run)
    assert run.step == 3
    code, _, err = run_cli("export_hf", f"--workdir={trained_run}", f"--out={tmp_path / 'hf'}",
                           capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err[-2000:]

    # transformers runs the exported model and gives our logits; our tokenizer is saved alongside.
    ids = np.asarray([run.tokenizer.encode("ROMEO: What, ho!")[:16]], np.int32)
    logits = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(ids)).logits)
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_forward(torch_model, ids)[0], logits, **TOL)
    assert load_tokenizer(tmp_path / "hf").encode("ROMEO:") == run.tokenizer.encode("ROMEO:")

    # ... and converts back into a workdir holding exactly the trained params.
    code, _, err = run_cli("import_hf", f"--name_or_path={tmp_path / 'hf'}",
                           f"--workdir={tmp_path / 'imported'}", capsys=capsys,
                           monkeypatch=monkeypatch)
    assert code == 0, err[-2000:]
    again = load_run(str(tmp_path / "imported"))
    assert again.model_config == run.model_config
    assert again.tokenizer.encode("ROMEO: What") == run.tokenizer.encode("ROMEO: What")
    a, b = flat(run.params), flat(again.params)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(a[path]), err_msg=path)


def test_clis_fail_with_one_line(trained_run, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli("export_hf", f"--workdir={tmp_path / 'missing'}",
                           f"--out={tmp_path / 'out'}", capsys=capsys, monkeypatch=monkeypatch)
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: workdir")
    assert not (tmp_path / "out").exists()

    code, _, err = run_cli("import_hf",  # an existing run is never touched
                           f"--name_or_path={tmp_path / 'nope'}", f"--workdir={trained_run}",
                           capsys=capsys, monkeypatch=monkeypatch)
    assert code != 0 and "Traceback" not in err
    assert re.match(r"error: workdir .* already exists and is not empty",
                    err.strip().splitlines()[-1])
