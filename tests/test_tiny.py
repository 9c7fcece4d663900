"""The offline tiny chat model: loads with the Auto classes, a chat template whose
generation prompt ends in a special token, resolve_pretrained, and seeded builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cfg_unlearn import tiny
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.tiny import BOS, EOS, PAD, ROLE_TOKENS, TinySpec, build_tiny, resolve_pretrained


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, offline) -> Path:
    """Built once per module, through resolve_pretrained (the 'build when missing' path)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    assert not path.exists()
    out = resolve_pretrained(f"tiny:{path}")
    assert out == str(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------ the built directory


def test_build_when_missing_writes_a_model_dir(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "tiny_spec.json"} <= names
    # built in a temp dir and renamed: nothing half-built left beside it
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["model"]


def test_built_model_is_readable_as_the_umask_allows(tmp_path, offline, assert_open_modes):
    """A shared tiny-model cache must be readable by the team (safetensors writes 0600)."""
    from cfg_unlearn.tiny import build_tiny

    assert_open_modes(build_tiny(tmp_path / "model"))


def test_tokenizer_special_tokens(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert len(ids) == 3 and None not in ids
    for t in ROLE_TOKENS:
        (i,) = tok(t, add_special_tokens=False)["input_ids"]
        assert i not in ids
        assert tok.convert_ids_to_tokens(i) == t


def test_model_loads_offline_and_runs(tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    spec = TinySpec()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (spec.hidden_size, spec.num_hidden_layers)
    ids = torch.tensor([tok("Hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_chat_template_renders_system_and_user(tok):
    msgs = [{"role": "system", "content": "Be private."}, {"role": "user", "content": "Who is Ann?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin|><|system|>Be private.<|end|><|user|>Who is Ann?<|end|><|assistant|>"
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|begin|><|system|>Be private.<|end|><|user|>Who is Ann?<|end|>"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "No."}], tokenize=False)
    assert full == no_gen + "<|assistant|>No.<|end|>"


def test_prompt_and_answer_tokenise_independently(tok):
    w = World(WorldConfig(seed=3, n_people=5))
    checked = 0
    for rec in w.pairs(system="Avoid using any personal data in the answers!"):
        msgs = [{"role": "system", "content": rec.system}, *rec.prompt]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|assistant|>")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert p_ids[0] == tok.bos_token_id
        assert p_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        for answer in (rec.chosen, rec.rejected, " leading space", "ünïcödé ✓ 😀"):
            a_ids = tok(answer, add_special_tokens=False)["input_ids"]
            assert tok(prompt + answer, add_special_tokens=False)["input_ids"] == p_ids + a_ids
            checked += 1
    assert checked > 50


def test_text_round_trips_through_tokenizer(tok):
    for text in ["The email address of Ann Lee is ann.lee7@gmail.com.", "  two  spaces\nnewline", "ünïcödé ✓ 😀"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


# ------------------------------------------------------------------ resolve_pretrained


def test_resolve_does_not_rebuild(tiny_dir, monkeypatch, capsys):
    cfg = tiny_dir / "config.json"
    before = (cfg.stat().st_mtime_ns, (tiny_dir / "model.safetensors").stat().st_mtime_ns)

    def boom(*a, **k):  # pragma: no cover - only runs on the bug
        raise AssertionError("build_tiny called for an existing model")

    monkeypatch.setattr(tiny, "build_tiny", boom)
    assert resolve_pretrained(f"tiny:{tiny_dir}") == str(tiny_dir)
    after = (cfg.stat().st_mtime_ns, (tiny_dir / "model.safetensors").stat().st_mtime_ns)
    assert after == before
    assert capsys.readouterr().err == ""  # nothing said when there is nothing to build


def test_resolve_refuses_nonempty_dir_without_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny, "build_tiny", lambda p: calls.append(p))
    d = tmp_path / "occupied"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    from cfg_unlearn.utils import ConfigError

    # a ConfigError (was FileExistsError, a traceback through train.py): one line, exit 2
    with pytest.raises(ConfigError, match=f"tiny:{d}: {d} exists but holds no model .no config.json."):
        resolve_pretrained(f"tiny:{d}")
    assert calls == []
    assert (d / "notes.txt").read_text() == "mine"


def test_resolve_builds_into_empty_existing_dir(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tiny, "build_tiny", lambda p: calls.append(Path(p)))
    d = tmp_path / "empty"
    d.mkdir()
    assert resolve_pretrained(f"tiny:{d}") == str(d)
    assert calls == [d]
    # a user review: a mistyped tiny: path built and trained a new model without a word
    assert capsys.readouterr().err == (f"tiny:{d}: no model in {d.resolve()} yet; building a new tiny one there "
                                       "(random weights)\n")
    # by one process of a multi-process launch
    monkeypatch.setenv("LOCAL_RANK", "1")
    (d / "config.json").unlink(missing_ok=True)
    calls.clear()
    resolve_pretrained(f"tiny:{d}")
    assert calls == [d] and capsys.readouterr().err == ""
    # left in place: the build's rename replaces an empty directory (removing it first
    # raced with other ranks doing the same, and failed on a mount point)
    assert d.is_dir()


def test_a_build_lands_on_an_empty_dir_and_a_lost_race_with_other_settings_is_an_error(tmp_path, offline):
    """Concurrent builds into one directory: the loser kept quiet even when it had been
    asked for another model than the one now there."""
    from cfg_unlearn.utils import ConfigError

    small = TinySpec(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    d = tmp_path / "m"
    d.mkdir()
    texts = ["a few words", "some more words"]
    build_tiny(d, texts=texts, spec=small)
    assert (d / "config.json").is_file()
    build_tiny(d, texts=texts, spec=small)  # lost the race to the same model: fine
    import json

    built = json.loads((d / "tiny_spec.json").read_text())["vocab_size"]  # fewer than asked: the corpus is tiny
    assert built < small.vocab_size
    build_tiny(d, texts=texts, spec=TinySpec(**{**small.__dict__, "vocab_size": built}))  # the same model as built
    with pytest.raises(ConfigError, match="already holds a tiny model built with other settings"):
        build_tiny(d, texts=texts, spec=TinySpec(**{**small.__dict__, "hidden_size": 32}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left


def test_a_build_lands_on_an_empty_dir_on_windows_too(tmp_path, offline, monkeypatch):
    """Windows renames a folder onto no existing one, not even an empty one: a build into
    an empty folder (made by hand, or by a launcher) failed after the whole build."""
    small = TinySpec(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    import os

    class WindowsOs:  # tiny's view of os (setting os.name itself breaks pathlib here)
        name = "nt"

        def __getattr__(self, attr):
            return getattr(os, attr)

        @staticmethod
        def rename(src, dst):
            if Path(dst).exists():
                raise FileExistsError(183, "Cannot create a file when that file already exists", str(dst))
            return os.rename(src, dst)

    monkeypatch.setattr(tiny, "os", WindowsOs())
    d = tmp_path / "m"
    d.mkdir()
    build_tiny(d, texts=["a few words", "some more words"], spec=small)
    assert (d / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_empty_mount_point_is_refused_before_building(tmp_path, monkeypatch):
    """A rename cannot replace a mount point: it failed with EBUSY after the whole build."""
    from cfg_unlearn.utils import ConfigError

    monkeypatch.setattr(tiny, "build_tiny", lambda p: pytest.fail("built"))
    monkeypatch.setattr(tiny.os.path, "ismount", lambda p: str(p) == str(tmp_path / "vol"))
    (tmp_path / "vol").mkdir()
    with pytest.raises(ConfigError, match="is a mount point"):
        resolve_pretrained(f"tiny:{tmp_path / 'vol'}")


def test_shapes_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match="must be even"):  # head size 3: the first forward failed
        TinySpec(hidden_size=12, num_attention_heads=4, num_key_value_heads=2)


def test_tiny_given_a_file_is_a_config_error(tmp_path):
    from cfg_unlearn.utils import ConfigError

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a directory"):
        resolve_pretrained(f"tiny:{tmp_path / 'f'}")


def test_resolve_expands_the_home_directory(monkeypatch, tmp_path):
    """`tiny:~/x` built ./~/x, a folder literally named "~" (one careless rm -rf ~/... away
    from the home folder)."""
    calls = []
    monkeypatch.setattr(tiny, "build_tiny", lambda p: calls.append(Path(p)))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("tiny:~/models/tiny") == str(tmp_path / "home" / "models" / "tiny")
    assert calls == [tmp_path / "home" / "models" / "tiny"] and not (tmp_path / "~").exists()


def test_a_path_that_is_no_model_is_a_one_line_error(tmp_path):
    """An existing directory without a model failed inside transformers ("You need to
    have sentencepiece or tiktoken installed"), a checkpoint file given as a model with
    "not a valid JSON file"; both are now ModelNotFoundError (a ConfigError) naming what
    is wrong."""
    from cfg_unlearn.models import ModelNotFoundError, load_causal_lm, load_tokenizer

    (tmp_path / "empty").mkdir()
    (tmp_path / "last.ckpt").write_bytes(b"\x80\x02}q")
    for load, what in ((load_tokenizer, "tokenizer"), (load_causal_lm, "model")):
        with pytest.raises(ModelNotFoundError, match=f"{what} '.*empty': the directory exists but holds no "
                                                     "Hugging Face model"):
            load(str(tmp_path / "empty"))
        with pytest.raises(ModelNotFoundError, match=f"{what} '.*last.ckpt' is a file, not a model directory"):
            load(str(tmp_path / "last.ckpt"))


def test_an_attention_backend_that_cannot_load_is_a_setting_error(tiny_dir, offline):
    """A mistyped or uninstalled ``attn_implementation`` was transformers' traceback,
    after the config and data setup; it is now a ConfigError naming the setting."""
    from cfg_unlearn.models import load_causal_lm
    from cfg_unlearn.utils import ConfigError

    with pytest.raises(ConfigError, match=r"attn_implementation 'sdpaa' cannot load model '.*': Specified "
                                          r"`attn_implementation=\"sdpaa\"` is not supported"):
        load_causal_lm(str(tiny_dir), attn_implementation="sdpaa")
    assert load_causal_lm(str(tiny_dir), attn_implementation="eager").config._attn_implementation == "eager"


def test_a_model_under_the_home_folder_loads(tiny_dir, tmp_path, monkeypatch, offline):
    """'~/m' reached transformers unexpanded, which read it as a malformed hub id."""
    import shutil

    from cfg_unlearn.models import load_causal_lm, load_tokenizer

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "m")
    assert load_tokenizer("~/m").eos_token == EOS
    assert load_causal_lm("~/m").config.vocab_size > 0


def test_an_adapter_dir_without_tokenizer_files_gives_its_base_models_tokenizer(tiny_dir, tmp_path, offline):
    """It got through to AutoTokenizer, which asked to install sentencepiece."""
    import json

    from cfg_unlearn.models import ModelNotFoundError, load_tokenizer

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_dir)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert load_tokenizer(str(adapter)).get_vocab() == load_tokenizer(str(tiny_dir)).get_vocab()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="names no base_model_name_or_path"):
        load_tokenizer(str(adapter))
    # a relative base saved beside the adapter; a missing one names the adapter it came from
    import shutil

    shutil.copytree(tiny_dir, adapter / "base")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    assert load_tokenizer(str(adapter)).get_vocab() == load_tokenizer(str(tiny_dir)).get_vocab()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelNotFoundError, match=r"tokenizer of adapter '.*adapter': base model '.*gone'"):
        load_tokenizer(str(adapter))


def test_an_adapter_dir_loads_as_its_base_with_the_adapter_merged(tiny_dir, tmp_path, offline, monkeypatch):
    """transformers injected an adapter directory's LoRA as adapter "default": a LoRA block
    on top re-initialised it (training, evaluation and the adapters-off reference all ran
    on the bare base), export could not save it, and a full fine-tune had nothing
    trainable. A relative base beside the adapter was looked up from the working folder."""
    import shutil

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from cfg_unlearn.models import load_causal_lm
    from cfg_unlearn.module import UnlearnModule

    shutil.copytree(tiny_dir, tmp_path / "base")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")  # the adapter alone, its base named as given
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace(json_str(tmp_path / "base"), json_str("../base")))
    monkeypatch.chdir(tiny_dir)  # "../base" from here is no model
    ids = torch.tensor([[1, 5, 9, 30, 44]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter")(ids).logits
        bare = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
        model = load_causal_lm(str(tmp_path / "adapter"))
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
        assert (want - bare).abs().max() > 0.1  # the adapter matters
        assert all(p.requires_grad for p in model.parameters())
        module = UnlearnModule(model=str(tmp_path / "adapter"), lora={"r": 2})
        module.configure_model()
        with module.model.disable_adapter():  # the reference NPO/DPO use: the adapter's model
            torch.testing.assert_close(module.model(ids).logits, want, atol=1e-5, rtol=1e-5)


def json_str(value) -> str:
    import json

    return json.dumps(str(value))


@pytest.mark.parametrize("device", ["meta", "xpu", "hpu"])
def test_devices_this_machine_cannot_use_are_refused(device):
    from cfg_unlearn.models import check_device

    if device != "meta" and getattr(getattr(__import__("torch"), device, None), "is_available", lambda: False)():
        pytest.skip(f"{device} is available here")
    with pytest.raises(ValueError, match=f"device '{device}'"):
        check_device(device)


def test_resolve_default_tiny_dir(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tiny, "build_tiny", lambda p: calls.append(Path(p)))
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("tiny:") == ".cache/cfg_unlearn/tiny"
    assert calls == [Path(".cache/cfg_unlearn/tiny")]


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-3.2-1B-Instruct", "/abs/path/model", "./rel", "tinyllama"])
def test_resolve_passes_other_names_through(name, monkeypatch):
    monkeypatch.setattr(tiny, "build_tiny", lambda p: pytest.fail("must not build"))
    assert resolve_pretrained(name) == name


# ------------------------------------------------------------------ seeded builds


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_same_seed_same_weights(tiny_dir, tmp_path, offline):
    other = build_tiny(tmp_path / "second")
    assert other == tmp_path / "second"
    a, b = _state(tiny_dir), _state(other)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (tiny_dir / "config.json").read_text() == (other / "config.json").read_text()
    # loading through transformers gives the same state dict too
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_different_seed_different_weights(tmp_path, offline):
    texts = ["hello world", "the email of ann is ann@x.org", "call bo at 555-0101"] * 5
    small = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    a = build_tiny(tmp_path / "s0", texts=texts, spec=TinySpec(seed=0, **small))
    b = build_tiny(tmp_path / "s0b", texts=texts, spec=TinySpec(seed=0, **small))
    c = build_tiny(tmp_path / "s1", texts=texts, spec=TinySpec(seed=1, **small))
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    # building does not disturb the caller's RNG stream
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(tmp_path / "s2", texts=texts, spec=TinySpec(seed=5, **small))
    assert torch.equal(torch.rand(3), x)


def test_an_adapter_dir_with_its_bases_config_json_still_loads_as_an_adapter(tiny_dir, tmp_path, offline):
    """Some trainers save the base's config.json beside the adapter: the directory was
    taken for a whole model and failed with 'no file named model.safetensors'."""
    import shutil

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from cfg_unlearn.models import adapter_base_model, load_causal_lm

    shutil.copytree(tiny_dir, tmp_path / "base")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "adapter" / "config.json")
    assert adapter_base_model(str(tmp_path / "adapter")) == str(tmp_path / "base")
    assert adapter_base_model(str(tmp_path / "base")) is None  # a whole model, config.json and weights
    ids = torch.tensor([[1, 5, 9, 30, 44]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter")(ids).logits
        torch.testing.assert_close(load_causal_lm(str(tmp_path / "adapter"))(ids).logits, want, atol=1e-5, rtol=1e-5)
