"""Distillation: the loss against hand-computed values, a tiny student getting closer to a tiny teacher,
bit-exact resume through train.py's loop, the on-disk top-k teacher cache, a Hugging Face teacher folder,
and the tokenizer/vocabulary refusals. Tiny models and a small corpus written here: fast on 2 CPU cores."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from toolkit import checkpoint, hf
from toolkit.cli import main
from toolkit.config import recipe_from_dict
from toolkit.corpus import default_corpus
from toolkit.data import load_documents, split, tokenize_documents
from toolkit.distill import distill, distillation_loss, kl_divergence, mean_kl, topk_kl_divergence
from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer
from toolkit.tokenizer import EOS, train_tokenizer

STUDENT = {"model": {"context_len": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "pos_encoding": "rope",
                     "norm_type": "rmsnorm", "ffn_type": "swiglu", "ffn_mult": 2.0},
           "training": {"steps": 30, "batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 2,
                        "eval_every": 10, "eval_batches": 4, "save_every": 10, "val_fraction": 0.1, "threads": 1}}


def student_recipe(**training):
    data = json.loads(json.dumps(STUDENT))
    data["training"].update(training)
    return recipe_from_dict(data, default_name="student")


# --- the loss ---------------------------------------------------------------------------------------
def test_loss_hand_computed():
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])  # p = (3/4, 1/4) at T = 1
    student = torch.zeros(1, 1, 2)  # q = (1/2, 1/2)
    target = torch.tensor([[0]])
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_divergence(student, teacher, 1.0).item() == pytest.approx(kl1, abs=1e-6)
    # T = 2: p = (sqrt3, 1) / (sqrt3 + 1); loss = alpha * T^2 * KL + (1 - alpha) * CE, CE = ln 2
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    loss, ce, kl = distillation_loss(student, target, alpha=0.25, temperature=2.0, teacher_logits=teacher)
    assert kl.item() == pytest.approx(kl2, abs=1e-6)
    assert ce.item() == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(0.25 * 4 * kl2 + 0.75 * math.log(2), abs=1e-6)
    # alpha = 0 is plain cross-entropy, alpha = 1 plain (scaled) KL
    assert distillation_loss(student, target, 0.0, 2.0, teacher_logits=teacher)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert distillation_loss(student, target, 1.0, 2.0, teacher_logits=teacher)[0].item() == pytest.approx(4 * kl2, abs=1e-6)


def test_topk_loss_hand_computed():
    teacher = torch.tensor([[[2.0, 1.0, 0.0, -5.0]]])
    values, indices = teacher.topk(2, dim=-1)
    student = torch.tensor([[[0.0, math.log(3.0), 5.0, 7.0]]])  # renormalised over ids 0, 1: q = 1/4, 3/4
    p = [math.exp(2) / (math.exp(2) + math.e), math.e / (math.exp(2) + math.e)]  # teacher renormalised over top-2
    want = p[0] * (math.log(p[0]) - math.log(0.25)) + p[1] * (math.log(p[1]) - math.log(0.75))
    assert topk_kl_divergence(student, values, indices).item() == pytest.approx(want, abs=1e-6)
    # the student's mass outside the teacher's top-k (ids 2, 3 here) is left to the cross-entropy term
    assert topk_kl_divergence(student + torch.tensor([0.0, 0.0, 9.0, 9.0]), values, indices).item() == pytest.approx(want, abs=1e-6)
    # with k = vocab the top-k KL is the full KL
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7) * 3
    v, i = t.topk(7, dim=-1)
    assert topk_kl_divergence(s, v, i, 1.5).item() == pytest.approx(kl_divergence(s, t, 1.5).item(), abs=1e-5)


# --- runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small corpus and a tiny, confidently-predicting teacher checkpoint (untrained, scaled-up head)."""
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(default_corpus()[:150]), encoding="utf-8")
    tok = train_tokenizer(load_documents(corpus), 300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context_len=64, d_model=48, n_layers=2, n_heads=4,
                      pos_encoding="rope", norm_type="rmsnorm", ffn_type="swiglu", tie_embeddings=False)
    torch.manual_seed(3)
    teacher = Transformer(cfg)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(60.0)  # peaked distributions, far from a fresh student's
    checkpoint.write_checkpoint(root / "teacher", teacher, tok, {"recipe": "teacher", "step": 0})
    return {"root": root, "corpus": str(corpus), "teacher": root / "teacher", "tok": tok}


def val_kl(student, world, recipe):
    tc = recipe.training
    teacher, tok, _ = checkpoint.load(world["teacher"])
    tokens = tokenize_documents(tok, load_documents(world["corpus"]), tok.token_to_id(EOS))
    _, val = split(tokens, tc.val_fraction, tc.seq_len)
    return mean_kl(student, teacher, val, tc.seq_len, tc.batch_size, tc.eval_batches)


def test_distillation_lowers_kl(world, tmp_path):
    recipe = student_recipe()
    recipe.model.vocab_size = world["tok"].get_vocab_size()
    torch.manual_seed(recipe.training.seed)  # train.py's initialisation of a fresh student
    before = val_kl(Transformer(recipe.model).eval(), world, recipe)
    ckpt = distill(student_recipe(), world["teacher"], tmp_path / "run", corpus=world["corpus"], alpha=0.9,
                   temperature=1.0, progress=False)
    student, stok, _ = checkpoint.load(ckpt)
    after = val_kl(student, world, recipe)
    assert after < 0.5 * before, (before, after)
    summary = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert summary["val_kl"] == pytest.approx(after, abs=1e-3)
    # the student adopted the teacher's tokenizer; the run records the distillation settings
    assert stok.to_str() == world["tok"].to_str()
    assert student.cfg.vocab_size == world["tok"].get_vocab_size()
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["distill"]["alpha"] == 0.9 and meta["distill"]["teacher"] == str(world["teacher"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in m and "distill_loss" in m for m in metrics)


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_resume_is_bit_exact(world, tmp_path):
    kw = dict(corpus=world["corpus"], alpha=0.5, temperature=2.0, progress=False)
    full = distill(student_recipe(steps=6, save_every=3), world["teacher"], tmp_path / "a", **kw)
    distill(student_recipe(steps=3, save_every=3), world["teacher"], tmp_path / "b", **kw)
    resumed = distill(student_recipe(steps=6, save_every=3), world["teacher"], tmp_path / "b", resume=True,
                      corpus=None, progress=False)  # alpha / temperature / corpus come from the run
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="alpha"):
        distill(student_recipe(steps=9, save_every=3), world["teacher"], tmp_path / "b", resume=True, alpha=0.1,
                progress=False)


def test_topk_cache_is_reused(world, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(corpus=world["corpus"], top_k_cache=8, cache_dir=cache, progress=False)
    first = distill(student_recipe(steps=4, save_every=4), world["teacher"], tmp_path / "a", **kw)
    files = sorted(cache.glob("step-*.safetensors"))
    assert [f.name for f in files] == [f"step-{i:06d}-rank0of1.safetensors" for i in range(4)]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    cached = load_file(str(files[0]))
    assert cached["indices"].shape == (8, 32, 8) and cached["indices"].dtype == torch.int32
    second = distill(student_recipe(steps=4, save_every=4), world["teacher"], tmp_path / "b", **kw)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read back, not recomputed
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different batch (another seed) for the same step is recomputed, not served stale
    distill(student_recipe(steps=1, seed=99), world["teacher"], tmp_path / "c", **kw)
    assert files[0].stat().st_mtime_ns != stamps[files[0]]
    # another K (or teacher) cannot use this cache
    with pytest.raises(ConfigError, match="another teacher or --top-k-cache"):
        distill(student_recipe(steps=1), world["teacher"], tmp_path / "d", **{**kw, "top_k_cache": 4})


def test_hf_teacher_folder(world, tmp_path):
    """A Hugging Face folder as teacher (written by export_hf; loading it needs no transformers)."""
    hf.export_hf(world["teacher"], tmp_path / "hf")
    ckpt = distill(student_recipe(steps=2, save_every=2), tmp_path / "hf", tmp_path / "run",
                   corpus=world["corpus"], progress=False)
    student, stok, _ = checkpoint.load(ckpt)
    assert student.cfg.vocab_size == world["tok"].get_vocab_size()
    assert json.loads((ckpt / "config.json").read_text())["special_tokens"]["eos"] == EOS


def test_cli_and_refusals(world, tmp_path, capsys):
    recipe = tmp_path / "student.toml"
    recipe.write_text(
        "[model]\ncontext_len = 64\nd_model = 32\nn_layers = 1\nn_heads = 4\n"
        "[training]\nbatch_size = 4\nseq_len = 16\neval_every = 2\nsave_every = 2\neval_batches = 1\n"
        "val_fraction = 0.1\nthreads = 1\n", encoding="utf-8")
    base = ["distill", str(recipe), "--teacher", str(world["teacher"]), "--corpus", world["corpus"], "--no-progress"]
    # an explicit vocabulary that conflicts with the teacher's tokenizer is refused
    assert main(base + ["--set", "tokenizer.vocab_size=999", "--out", str(tmp_path / "x")]) == 2
    assert "teacher's tokenizer" in capsys.readouterr().err
    assert main(base + ["--alpha", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
    assert main(base + ["--steps", "2", "--set", "training.seq_len=80", "--set", "model.context_len=128", "--out", str(tmp_path / "x")]) == 2
    assert "teacher's context_len" in capsys.readouterr().err
    # a working run, with the matching vocabulary spelled out, and the top-k cache in OUT
    vocab = world["tok"].get_vocab_size()
    assert main(base + ["--steps", "2", "--top-k-cache", "4", "--set", f"model.vocab_size={vocab}",
                        "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "teacher-cache" / "cache.json").is_file()
    assert "checkpoint:" in capsys.readouterr().out
    assert main(base + ["--steps", "2", "--out", str(tmp_path / "run")]) == 2  # exists: --resume or --overwrite
    assert main(base + ["--steps", "4", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["distill"]["top_k_cache"] == 4
