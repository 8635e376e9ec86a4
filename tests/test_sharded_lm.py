"""Loading a language model sharded (issue 25): built on the meta device, each rank reads only
its rows from the checkpoint, and the result is the model ``from_pretrained`` loads.

Two gloo processes load tiny random Llama (tied LM head, an odd vocabulary so that the rows split
unevenly) and BERT checkpoints written by ``save_pretrained``; the parent compares."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

from test_lm import tiny_tokenizer  # noqa: E402

WORLD = 2


def tiny_models(root):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the test's own init
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=33, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, is_decoder=True,
    ))
    bert = BertModel(BertConfig(vocab_size=33, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=64))
    dirs = {}
    for name, model in (("llama", llama), ("bert", bert)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tiny_tokenizer().save_pretrained(dirs[name])
    return dirs


def worker(rank, init, dirs, out):
    from zoptim.lm.models import load_sharded

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    ids = torch.randint(0, 33, (2, 7), generator=torch.Generator().manual_seed(0))
    results = {}
    loads = [(name, path, {}) for name, path in dirs.items()]
    loads.append(("llama-replicated", dirs["llama"], {"shard_embeddings": False}))
    for name, path, options in loads:
        model, _ = load_sharded(str(path), **options)
        with torch.no_grad():
            outputs = model(input_ids=ids)[0]
        results[name] = {
            "params": {n: p.full_tensor() if hasattr(p, "full_tensor") else p.clone()
                       for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "held": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()),
            "kinds": {type(p).__name__ for p in model.parameters()},
            "tied": getattr(model, "lm_head", None) is not None
                    and model.lm_head.weight is model.model.embed_tokens.weight,
            "outputs": outputs,
        }
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded-lm")
    dirs = tiny_models(tmp)
    mp.spawn(worker, args=(str(tmp / "init"), dirs, str(tmp / "out")), nprocs=WORLD, join=True)
    return dirs, [torch.load(f"{tmp / 'out'}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_load_sharded_equals_from_pretrained_with_each_rank_holding_its_rows_only(loaded, name):
    from transformers import AutoModel, AutoModelForCausalLM

    dirs, results = loaded
    ranks = [r[name] for r in results]
    cls = AutoModelForCausalLM if name == "llama" else AutoModel
    reference = cls.from_pretrained(dirs[name]).eval()
    ref_params = dict(reference.named_parameters())
    ids = torch.randint(0, 33, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = reference(input_ids=ids)[0]
    total = sum(p.numel() for p in reference.parameters())
    for got in ranks:
        assert got["params"].keys() == ref_params.keys()
        for n, p in got["params"].items():
            assert torch.equal(p, ref_params[n]), n
        for n, b in reference.named_buffers():  # computed at build (rotary frequencies, position ids)
            assert torch.equal(got["buffers"][n], b), n
        assert got["kinds"] == {"DTensor"}
        assert torch.allclose(got["outputs"], ref_out, atol=1e-6)
    assert sum(r["held"] for r in ranks) == total and max(r["held"] for r in ranks) < total
    if name == "llama":  # the tied LM head stays one tensor (sharded once)
        assert all(r["tied"] for r in ranks)


def test_with_shard_embeddings_false_each_rank_holds_the_embedding_whole_and_the_head_stays_tied(loaded):
    from transformers import AutoModelForCausalLM

    dirs, results = loaded
    reference = AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    ids = torch.randint(0, 33, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = reference(input_ids=ids)[0]
    embedding = reference.model.embed_tokens.weight
    total = sum(p.numel() for p in reference.parameters())
    for got in (r["llama-replicated"] for r in results):
        for n, p in reference.named_parameters():
            assert torch.equal(got["params"][n], p), n
        assert got["kinds"] == {"DTensor", "Parameter"}  # the embedding a plain Parameter, the rest sharded
        assert got["tied"]
        assert torch.allclose(got["outputs"], ref_out, atol=1e-6)
        rest = total - embedding.numel()
        assert embedding.numel() + rest // WORLD <= got["held"] <= embedding.numel() + rest // WORLD + 64
