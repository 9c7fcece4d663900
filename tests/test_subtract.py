"""Model subtraction (task vectors): every output tensor is exactly base - alpha * (ft -
base), single-file and sharded, fp32 and bf16; the output loads as a model; bad inputs
fail with messages that name the tensor and the files; the output is written atomically
and never over a non-empty directory unless asked."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cfg_unlearn import subtract as sub
from cfg_unlearn.subtract import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorInfo,
    main,
    read_layout,
    subtract_models,
    subtract_tensor,
    write_safetensors_streaming,
)


# ----------------------------------------------------------------------------- helpers


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (tiny models only)."""
    layout = read_layout(model_dir)
    out = {}
    for file in layout.files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def perturbed_copy(src: Path, dst: Path, seed: int, dtype: torch.dtype | None = None, **save_kwargs) -> Path:
    """A 'fine-tuned' model: the base plus seeded noise on every parameter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    if dtype is not None:
        model = model.to(dtype)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    model.save_pretrained(dst, **save_kwargs)
    return dst


def crafted(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A minimal model directory: a config and one safetensors file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    return path


def leftovers(parent: Path) -> list[str]:
    """Temp dirs a run may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def ft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("ft") / "model", seed=1)


@pytest.fixture(scope="module")
def base_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_weights(tiny_model_dir)


@pytest.fixture(scope="module")
def ft_weights(ft_dir) -> dict[str, torch.Tensor]:
    return load_weights(ft_dir)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("alpha", [0.5, 1.25])
def test_every_tensor_is_base_minus_alpha_task_vector(tiny_model_dir, ft_dir, base_weights, ft_weights, tmp_path,
                                                      alpha):
    out = tmp_path / "out"
    summary = subtract_models(tiny_model_dir, ft_dir, out, alpha=alpha, progress=False)
    got = load_weights(out)
    assert got.keys() == base_weights.keys()
    for name, b in base_weights.items():
        f = ft_weights[name]
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], b - alpha * (f - b)), name
        assert not torch.equal(got[name], b), f"{name} unchanged"
    assert summary.tensors == summary.float_tensors == len(base_weights)
    assert summary.parameters == sum(t.numel() for t in base_weights.values())
    expected_norm = math.sqrt(sum(float((ft_weights[n] - b).norm()) ** 2 for n, b in base_weights.items()))
    assert summary.task_vector_norm == pytest.approx(expected_norm, rel=1e-5)
    # single file in, single file out, with the base's metadata and non-weight files
    assert not (out / INDEX_FILE).exists()
    with safe_open(str(out / SINGLE_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert leftovers(tmp_path) == []


def test_output_is_readable_as_the_umask_allows(tiny_model_dir, ft_dir, tmp_path, assert_open_modes):
    subtract_models(tiny_model_dir, ft_dir, tmp_path / "out", alpha=0.5, progress=False)
    assert_open_modes(tmp_path / "out")


def test_alpha_zero_gives_the_base_exactly(tiny_model_dir, ft_dir, base_weights, tmp_path):
    subtract_models(tiny_model_dir, ft_dir, tmp_path / "out", alpha=0.0, progress=False)
    got = load_weights(tmp_path / "out")
    assert got.keys() == base_weights.keys()
    assert all(torch.equal(got[n], b) for n, b in base_weights.items())


def test_sharded_output_mirrors_the_base_sharding(tiny_model_dir, ft_dir, base_weights, ft_weights, tmp_path):
    from transformers import AutoModelForCausalLM

    base = perturbed_copy(tiny_model_dir, tmp_path / "base", seed=None, max_shard_size="1MB")
    base_index = json.loads((base / INDEX_FILE).read_text())
    shards = sorted(set(base_index["weight_map"].values()))
    assert len(shards) >= 3
    out = tmp_path / "out"
    summary = subtract_models(base, ft_dir, out, alpha=0.5, progress=False)  # ft is single-file: layouts differ
    assert summary.shards == len(shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base_weights.values())
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f, safe_open(str(base / shard), framework="pt") as g:
            assert set(f.keys()) == set(g.keys())
            assert f.metadata() == g.metadata()
            for name in f.keys():
                b, ft = base_weights[name], ft_weights[name]
                assert torch.equal(f.get_tensor(name), b - 0.5 * (ft - b)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[n], base_weights[n] - 0.5 * (ft_weights[n] - base_weights[n])) for n in base_weights)


def test_output_loads_and_gives_finite_logits(tiny_model_dir, ft_dir, base_weights, ft_weights, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    subtract_models(tiny_model_dir, ft_dir, out, alpha=0.5, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    name = "model.embed_tokens.weight"
    b, f = base_weights[name], ft_weights[name]
    assert torch.equal(model.get_input_embeddings().weight, b - 0.5 * (f - b))
    ids = tok("What is the e-mail of Ann Lee?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_bf16_is_combined_in_fp32_and_cast_back(tiny_model_dir, tmp_path):
    base = perturbed_copy(tiny_model_dir, tmp_path / "base", seed=None, dtype=torch.bfloat16)
    ft = perturbed_copy(tiny_model_dir, tmp_path / "ft", seed=2, dtype=torch.bfloat16)
    subtract_models(base, ft, tmp_path / "out", alpha=0.5, progress=False)
    got, bw, fw = load_weights(tmp_path / "out"), load_weights(base), load_weights(ft)
    differs_from_bf16_arithmetic = False
    for name, b in bw.items():
        assert got[name].dtype == torch.bfloat16, name
        f32 = (b.float() - 0.5 * (fw[name].float() - b.float())).to(torch.bfloat16)
        assert torch.equal(got[name], f32), name
        differs_from_bf16_arithmetic |= not torch.equal(got[name], b - 0.5 * (fw[name] - b))
    assert differs_from_bf16_arithmetic  # the fp32 path was taken, not bf16 arithmetic


def test_non_float_buffers_are_copied_when_equal_and_refused_when_not(tmp_path):
    w, ids = torch.randn(3, 4), torch.arange(6)
    base = crafted(tmp_path / "b", {"w": w, "ids": ids, "mask": torch.tensor([True, False])})
    ft = crafted(tmp_path / "f", {"w": w + 1, "ids": ids.clone(), "mask": torch.tensor([True, False])})
    summary = subtract_models(base, ft, tmp_path / "out", alpha=0.5, progress=False)
    got = load_file(str(tmp_path / "out" / SINGLE_FILE))
    assert torch.equal(got["ids"], ids) and got["ids"].dtype == torch.int64
    assert torch.equal(got["mask"], torch.tensor([True, False]))
    assert torch.equal(got["w"], w - 0.5 * ((w + 1) - w))
    assert (summary.float_tensors, summary.copied_tensors) == (1, 2)

    other = crafted(tmp_path / "f2", {"w": w, "ids": ids + 1, "mask": torch.tensor([True, False])})
    with pytest.raises(ValueError, match=r"'ids'.*not a float tensor and differs") as e:
        subtract_models(base, other, tmp_path / "out2", progress=False)
    assert str(base / SINGLE_FILE) in str(e.value) and str(other / SINGLE_FILE) in str(e.value)
    assert not (tmp_path / "out2").exists()


def test_subtract_tensor_checks_its_inputs():
    a = torch.ones(2, 2)
    with pytest.raises(ValueError, match="'x'"):
        subtract_tensor(a, torch.ones(2, 3), 0.5, name="x")
    with pytest.raises(ValueError, match="'x'"):
        subtract_tensor(a, a.double(), 0.5, name="x")
    assert subtract_tensor(a.double(), 3 * a.double(), 0.5).dtype == torch.float64
    assert torch.equal(subtract_tensor(a.double(), 3 * a.double(), 0.5), torch.zeros(2, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- errors


def test_renamed_tensor_is_named_in_the_error(tmp_path):
    base = crafted(tmp_path / "b", {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)})
    ft = crafted(tmp_path / "f", {"a.weight": torch.zeros(2), "b.renamed": torch.zeros(2)})
    with pytest.raises(ValueError, match="different tensor names") as e:
        subtract_models(base, ft, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert f"1 only in {base}: 'b.weight'" in msg and f"1 only in {ft}: 'b.renamed'" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_shape_mismatch_names_tensor_and_files(tmp_path):
    base = crafted(tmp_path / "b", {"w": torch.zeros(2, 3)})
    ft = crafted(tmp_path / "f", {"w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"tensor 'w': shape \[2, 3\] vs \[3, 2\]") as e:
        subtract_models(base, ft, tmp_path / "out", progress=False)
    assert str(base / SINGLE_FILE) in str(e.value) and str(ft / SINGLE_FILE) in str(e.value)


def test_dtype_mismatch_names_tensor_and_files(tmp_path):
    base = crafted(tmp_path / "b", {"w": torch.zeros(2, 3)})
    ft = crafted(tmp_path / "f", {"w": torch.zeros(2, 3, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"tensor 'w': dtype F32 vs BF16") as e:
        subtract_models(base, ft, tmp_path / "out", progress=False)
    assert str(base / SINGLE_FILE) in str(e.value) and str(ft / SINGLE_FILE) in str(e.value)


def test_another_architecture_with_the_same_tensors_is_refused(tiny_model_dir, ft_dir, tmp_path):
    """8 heads of 16 where the base has 4 of 32 (or another rotary base): same tensor names
    and shapes, and the tensor headers passed them as a fine-tune."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(ft_dir, other)
    original = json.loads((ft_dir / "config.json").read_text())
    heads = original["num_attention_heads"]
    (other / "config.json").write_text(json.dumps({**original, "num_attention_heads": 2 * heads}))
    with pytest.raises(ValueError, match=rf"config field 'num_attention_heads': {heads} in .*config.json vs "
                                         rf"{2 * heads} in .*other/config.json: the two models are not one"):
        subtract_models(tiny_model_dir, other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # fields that do not change what the weights mean are not compared; nor is the form a
    # config is written in: an older file's rope_theta (and defaults left out) against the
    # rope_parameters and spelled-out defaults another transformers version saves
    old_style = {k: v for k, v in original.items() if k not in ("rope_parameters", "head_dim", "attention_bias")}
    old_style["rope_theta"] = original["rope_parameters"]["rope_theta"]
    (other / "config.json").write_text(json.dumps({**old_style, "transformers_version": "0.0", "use_cache": False}))
    subtract_models(tiny_model_dir, other, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / SINGLE_FILE).is_file()


def test_missing_safetensors_files(tmp_path):
    base = crafted(tmp_path / "b", {"w": torch.zeros(2)})
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no {SINGLE_FILE} or {INDEX_FILE} in {empty}"):
        subtract_models(base, empty, tmp_path / "out", progress=False)
    sharded = tmp_path / "s"
    sharded.mkdir()
    (sharded / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        subtract_models(base, sharded, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        subtract_models(base, tmp_path / "nowhere", tmp_path / "out", progress=False)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_finite(tmp_path, alpha):
    base = crafted(tmp_path / "b", {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        subtract_models(base, base, tmp_path / "out", alpha=alpha, progress=False)


def test_an_alpha_that_overflows_the_dtype_is_refused(tmp_path):
    """A finite alpha large enough to overflow (1e39 in fp32, 1e5 in fp16 here) wrote an
    all-inf model and exited 0; a base that holds its own inf is not blamed on alpha."""
    base = crafted(tmp_path / "b", {"w": torch.zeros(3), "h": torch.zeros(2, dtype=torch.float16)})
    ft = crafted(tmp_path / "f", {"w": torch.ones(3), "h": torch.ones(2, dtype=torch.float16)})
    with pytest.raises(ValueError, match=r"tensor 'w': alpha=1e\+39 overflows torch.float32 in 3 of 3 values"):
        subtract_models(base, ft, tmp_path / "out", alpha=1e39, progress=False)
    with pytest.raises(ValueError, match=r"tensor 'h': alpha=100000 overflows torch.float16"):
        sub.subtract_tensor(torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float16), 1e5, "h")
    assert not (tmp_path / "out").exists()
    inf = torch.tensor([float("inf"), 1.0])
    out = sub.subtract_tensor(inf, inf, 0.5, "x")
    assert out[1] == 1.0 and not torch.isfinite(out[0])  # the base's own inf passes through


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    base = crafted(tmp_path / "b", {"w": torch.zeros(2, 3)})
    ft = crafted(tmp_path / "f", {"w": torch.zeros(3, 2)})
    with pytest.raises(SystemExit) as e:
        main(["--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 2
    assert "cfg-unlearn subtract: error: tensor 'w': shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--base", str(base), "--finetuned", str(base), "--out", str(tmp_path / "o"), "--alpha", "nan"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_corrupt_inputs_name_their_file_and_exit_2(tmp_path, capsys):
    """A truncated safetensors file was a traceback ending 'SafetensorError: invalid
    header length', and a broken config.json or index a bare JSON message naming no file."""
    base = crafted(tmp_path / "b", {"w": torch.zeros(2, 3)})
    bad = crafted(tmp_path / "bad", {"w": torch.ones(2, 3)})
    weights = bad / SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[:5])
    broken = crafted(tmp_path / "cfg", {"w": torch.ones(2, 3)})
    (broken / "config.json").write_text('{"model_type": ')
    index = crafted(tmp_path / "idx", {"w": torch.ones(2, 3)})
    (index / INDEX_FILE).write_text("{weight_map")
    for ft, message in ((bad, f"{weights}: not a readable safetensors file"),
                        (broken, f"{broken / 'config.json'}: invalid JSON: Expecting value at line 1 column 16"),
                        (index, f"{index / INDEX_FILE}: invalid JSON: Expecting property name")):
        with pytest.raises(SystemExit) as e:
            main(["--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "out"), "--quiet"])
        assert e.value.code == 2 and message in capsys.readouterr().err, ft
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- output handling


def test_refuses_to_overwrite_unless_asked(tmp_path):
    base = crafted(tmp_path / "b", {"w": torch.ones(2)})
    ft = crafted(tmp_path / "f", {"w": torch.full((2,), 3.0)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        subtract_models(base, ft, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(FileExistsError, match=r"holds files that are not a model \(keep.txt\)"):
        subtract_models(base, ft, out, alpha=0.5, overwrite=True, progress=False)  # a folder of other files
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / SINGLE_FILE).write_bytes(b"")  # weights alone: not yet a model folder
    with pytest.raises(FileExistsError, match="holds files that are not a model"):
        subtract_models(base, ft, out, alpha=0.5, overwrite=True, progress=False)
    (out / "config.json").write_text("{}")  # with its config: a previous output
    subtract_models(base, ft, out, alpha=0.5, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]  # keep.txt went with it
    assert torch.equal(load_file(str(out / SINGLE_FILE))["w"], torch.zeros(2))  # 1 - 0.5 * (3 - 1)
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    subtract_models(base, ft, empty, progress=False)  # an empty directory is fine
    assert (empty / SINGLE_FILE).is_file()
    with pytest.raises(ValueError, match="is one of the inputs"):
        subtract_models(base, ft, base, overwrite=True, progress=False)
    # the inputs' parent directory: --overwrite would have replaced it, inputs and all
    with pytest.raises(ValueError, match="contains the input"):
        subtract_models(base, ft, base.parent, overwrite=True, progress=False)
    assert (base / SINGLE_FILE).is_file() and ft.is_dir()


def test_interrupted_run_leaves_no_output(tiny_model_dir, ft_dir, tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return subtract_tensor(*args, **kwargs)

    monkeypatch.setattr(sub, "subtract_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        subtract_models(tiny_model_dir, ft_dir, tmp_path / "out", progress=False)
    assert len(calls) == 5
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_end_to_end(tiny_model_dir, ft_dir, base_weights, ft_weights, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--base", str(tiny_model_dir), "--finetuned", str(ft_dir), "--alpha", "0.5", "--out", str(out), "--quiet"])
    assert f"wrote {out} ({len(base_weights)} tensors" in capsys.readouterr().out
    got = load_weights(out)
    assert all(torch.equal(got[n], b - 0.5 * (ft_weights[n] - b)) for n, b in base_weights.items())
    # tiny:<dir> names a model here as everywhere else (it was "not a directory")
    main(["--base", f"tiny:{tiny_model_dir}", "--finetuned", str(ft_dir), "--alpha", "0.5", "--out",
          str(tmp_path / "tiny-name"), "--quiet"])
    assert load_weights(tmp_path / "tiny-name").keys() == got.keys()
    assert all(torch.equal(load_weights(tmp_path / "tiny-name")[n], t) for n, t in got.items())


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f32": torch.randn(2, 5),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "f16": torch.randn(1, 3, dtype=torch.float16),
        "i64": torch.arange(5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),  # non-contiguous input
    }
    with safe_open(str(_save(tmp_path / "ref.safetensors", tensors)), framework="pt") as ref:
        entries = [TensorInfo(k, "x", ref.get_slice(k).get_dtype(), tuple(ref.get_slice(k).get_shape()))
                   for k in ref.keys()]
    path = tmp_path / "out.safetensors"
    size = write_safetensors_streaming(path, entries, lambda e: tensors[e.name], {"format": "pt", "k": "v"})
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    got = load_file(str(path))
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and all(v["data_offsets"][0] % 8 == 0 for k, v in header.items() if k in ("f64", "i64"))
    with pytest.raises(ValueError, match="'f32'"):
        write_safetensors_streaming(tmp_path / "bad.safetensors", entries,
                                    lambda e: tensors[e.name].reshape(-1) if e.name == "f32" else tensors[e.name])


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
    return path


def test_an_exports_decoding_is_not_copied_from_the_base(tiny_model_dir, ft_dir, tmp_path):
    """A demo's leaky model (or an export) as the base carries a cfg_unlearn.json: copied,
    `chat` took the subtracted model for an export meant to be guided as the base was."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "cfg_unlearn.json").write_text("{}")
    subtract_models(base, ft_dir, tmp_path / "out", alpha=0.5, progress=False)
    assert not (tmp_path / "out" / "cfg_unlearn.json").exists()
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
