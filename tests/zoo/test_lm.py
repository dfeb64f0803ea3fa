"""Language models: the next-token loss, the plain GPT and HuggingFace causal LMs, exact in float64 against
dense references that see the whole dataset at once (tests/reference.py's double backward for the Hessian;
here, explicit Jᵀ M J for the GGN with M the per-token softmax Hessian, and per-sequence gradients for the
empirical Fisher)."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from hf_checkpoints import BROKEN, POSITIONS, VOCAB, broken_checkpoints, tiny_hf
from reference import autograd_hessian, next_token_loss, reference_hessian, relative_error
from torch import Tensor, nn

import hessops
from hessops.errors import CheckpointError, EmptyDataError, TargetShapeError, UnknownModelError
from hessops.operators.losses import NextTokenCrossEntropy, loss_spec, next_token_cross_entropy
from hessops.zoo.lm import GPT, GPTConfig, gpt_config, load_hf_model

RTOL64 = 1e-10  # float64 sums in another order: ~1e-15 relative, room for the conditioning of tiny models
B, T, V = 6, POSITIONS, VOCAB
ALL = 400  # columns in one vmap: every column of the tiny models' (308) in one block
LENGTHS = [6, 3, 5, 2, 6, 4]  # right-padded to T: 20 counted shifted labels of 30


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=4)).double().eval()


def tokens() -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask and labels (-100 at padding) of B right-padded sequences."""
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    return ids, mask, torch.where(mask.bool(), ids, -100)


def dict_batches(sizes: list[int]) -> list[dict[str, Tensor]]:
    ids, mask, labels = tokens()
    batches, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        batches.append({"input_ids": ids[part], "attention_mask": mask[part], "labels": labels[part]})
        start += size
    return batches


def unpadded_batches() -> list[tuple[Tensor, Tensor]]:
    """Each sequence alone at its own length, as a plain (input_ids, labels) pair: no padding at all."""
    ids, _, _ = tokens()
    return [(ids[i : i + 1, :n], ids[i : i + 1, :n]) for i, n in enumerate(LENGTHS)]


def dense(operator) -> Tensor:
    """One product with the identity: one pass over the data (``to_dense`` makes one per column)."""
    return operator @ torch.eye(operator.shape[0], dtype=operator.dtype)


def probes(n: int, columns: int = 12) -> Tensor:
    """Random columns to compare an operator with its dense reference on: ``A V = R V`` for Gaussian ``V``
    tests every entry of ``A − R`` (a difference is missed only on a null set), at a fraction of the cost of
    ``A @ I``."""
    return torch.randn(n, columns, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def logits_of(outputs):
    return outputs if isinstance(outputs, Tensor) else outputs.logits


# -- dense references on the whole dataset ---------------------------------------------------------------
def lm_reference_hessian(model: nn.Module) -> Tensor:
    """tests/reference.py's double backward on the whole dataset as one batch, under its own next-token loss (no
    hessops code; checked against finite differences in tests/test_reference.py)."""
    return reference_hessian(model, next_token_loss, dict_batches([B]))


def output_jacobian(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Logits (B, T, V) and their Jacobian (B·T·V, n) by reverse mode, one row per logit."""
    ids, mask, _ = tokens()
    params = list(model.parameters())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        logits = logits_of(model(input_ids=ids, attention_mask=mask)).reshape(-1)
        eye = torch.eye(logits.numel(), dtype=logits.dtype)
        rows = torch.autograd.grad(
            logits, params, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
    jacobian = torch.cat([r.reshape(logits.numel(), -1) for r in rows], dim=1)
    return logits.detach().reshape(B, T, V), jacobian


def reference_ggn(model: nn.Module) -> Tensor:
    """(1/W) Σ over counted (n, t) of J_ntᵀ (diag p − p pᵀ) J_nt, p = softmax(logits[n, t]), t predicting t+1."""
    _, _, labels = tokens()
    logits, jacobian = output_jacobian(model)
    jacobian = jacobian.reshape(B, T, V, -1)
    counted = [(n, t) for n in range(B) for t in range(T - 1) if labels[n, t + 1] != -100]
    total = torch.zeros(jacobian.shape[-1], jacobian.shape[-1], dtype=torch.float64)
    for n, t in counted:
        p = logits[n, t].softmax(-1)
        total += jacobian[n, t].T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian[n, t]
    return total / len(counted)


def reference_empirical_fisher(model: nn.Module) -> Tensor:
    """(1/W) Σ_n w_n g_n g_nᵀ, g_n the gradient of sequence n's own mean token loss, w_n its counted labels."""
    ids, mask, labels = tokens()
    params = list(model.parameters())
    total, weight = 0, 0
    for n in range(B):
        w = int((labels[n, 1:] != -100).sum())
        out = logits_of(model(input_ids=ids[n : n + 1], attention_mask=mask[n : n + 1]))
        g = torch.cat(
            [t.reshape(-1) for t in torch.autograd.grad(next_token_cross_entropy(out, labels[n : n + 1]), params)]
        )
        total, weight = total + w * torch.outer(g, g), weight + w
    return total / weight


REFERENCES = {"hessian": lm_reference_hessian, "ggn": reference_ggn, "ef": reference_empirical_fisher}
OPERATORS = {"hessian": hessops.Hessian, "ggn": hessops.GGN, "ef": hessops.EmpiricalFisher}


@pytest.fixture(scope="module")
def gpt_references():
    model = tiny_gpt()
    return model, {kind: reference(model) for kind, reference in REFERENCES.items()}


# -- the loss --------------------------------------------------------------------------------------------
def test_the_loss_is_the_mean_over_counted_shifted_tokens():
    logits = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, 2, -100], [2, -100, -100, -100]])
    pairs = [(0, 0, 1), (0, 1, 2), (1, 0, -100)]  # (n, t, label t+1); the -100 is not counted
    expected = torch.stack([-logits[n, t].log_softmax(-1)[y] for n, t, y in pairs if y != -100]).mean()
    assert torch.allclose(next_token_cross_entropy(logits, labels), expected, rtol=1e-14, atol=0)
    for form in (next_token_cross_entropy, NextTokenCrossEntropy(), functools.partial(next_token_cross_entropy)):
        spec = loss_spec(form)
        assert spec.kind == "next_token" and spec.ignore_index == -100
        assert spec.example_weights(labels, 2).tolist() == [2.0, 0.0]
    assert loss_spec(NextTokenCrossEntropy(reduction="sum")).mean is False


@pytest.mark.parametrize(
    "logits_shape, labels",
    [((2, 4, 3), torch.zeros(2, 5, dtype=torch.long)), ((2, 4, 3), torch.zeros(2, 4)), ((8, 3), torch.zeros(8).long())],
)
def test_the_loss_refuses_shapes_that_do_not_match(logits_shape, labels):
    with pytest.raises(TargetShapeError, match=r"logits \(B, T, V\) and integer labels \(B, T\)"):
        next_token_cross_entropy(torch.zeros(logits_shape), labels)


# -- the plain GPT ---------------------------------------------------------------------------------------
def test_gpt_sizes_and_shapes():
    small = gpt_config("gpt2-small")
    assert (small.n_layer, small.n_head, small.n_embd, small.vocab_size, small.block_size) == (12, 12, 768, 50257, 1024)
    with torch.device("meta"):  # GPT-2 small's published count, 124,439,808, with its tied output layer
        assert sum(p.numel() for p in GPT(small).parameters()) == 124_439_808
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    assert model(torch.zeros(2, T, dtype=torch.long)).shape == (2, T, V)
    with pytest.raises(UnknownModelError, match="gpt2-small"):
        gpt_config("gpt-9")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=3, n_embd=4)


def test_padding_is_invisible_to_the_tokens_before_it():
    model = tiny_gpt()
    ids, mask, _ = tokens()
    padded = model(ids, mask)
    for i, n in enumerate(LENGTHS):
        alone = model(ids[i : i + 1, :n])
        assert torch.allclose(padded[i, :n], alone[0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", OPERATORS)
def test_gpt_operators_are_exact_under_any_batching_and_right_padding(gpt_references, kind):
    model, references = gpt_references
    V = probes(references[kind].shape[0])
    for data, micro in ((dict_batches([2, 4]), None), (dict_batches([6]), 1), (unpadded_batches(), None)):
        operator = OPERATORS[kind](model, next_token_cross_entropy, data, micro_batch_size=micro, chunk_size=ALL)
        assert relative_error(operator @ V, references[kind] @ V) < RTOL64, (kind, micro, len(data))


def test_left_padding_is_another_function_for_learned_positions(gpt_references):
    """What docs/transformers.md says: pad on the right. The same sequences padded on the left sit at other
    absolute positions, so a GPT's Hessian is another matrix (measured ~1.0 relative; any order-one gap shows it),
    where right padding is exact (test above)."""
    model, references = gpt_references
    ids, mask, labels = tokens()
    shifts = [T - n for n in LENGTHS]
    left = {
        "input_ids": torch.stack([row.roll(s) for row, s in zip(ids, shifts)]),
        "attention_mask": torch.stack([row.roll(s) for row, s in zip(mask, shifts)]),
        "labels": torch.stack([row.roll(s) for row, s in zip(labels, shifts)]),
    }
    V = probes(references["hessian"].shape[0])
    operator = hessops.Hessian(model, next_token_cross_entropy, [left], chunk_size=ALL)
    assert relative_error(operator @ V, references["hessian"] @ V) > 0.1


def test_the_dense_hessian_agrees_with_plain_double_backward(gpt_references):
    """hessops.dense_hessian, batched and padded, under hessops' loss, against tests/reference.py's row-by-row
    double backward on the whole dataset under its own loss (the fixture's reference), and under hessops' loss."""
    model, references = gpt_references
    ids, mask, labels = tokens()
    plain = autograd_hessian(model, next_token_cross_entropy, {"input_ids": ids, "attention_mask": mask}, labels)
    result = hessops.dense_hessian(model, next_token_cross_entropy, dict_batches([1, 5]))
    assert relative_error(result, references["hessian"]) < RTOL64
    assert relative_error(plain, references["hessian"]) < RTOL64


def test_mc_fisher_samples_each_shifted_token_from_its_own_position(gpt_references):
    """On the GPT: E[MCFisher] = GGN (categorical likelihood), so with S samples the error is a Monte-Carlo one,
    ~1/√S. A sample drawn from the wrong position (no shift) would be off by O(1), not by this; a bias of a few
    percent would pass: the exact test of the next-token MCFisher (shift and padding) is
    tests/operators/test_mcfisher.py."""
    model, references = gpt_references
    samples = 1000
    data = dict_batches([2, 4])
    fisher = hessops.MCFisher(model, next_token_cross_entropy, data, samples=samples, seed=0, chunk_size=ALL)
    error = relative_error(dense(fisher), references["ggn"])
    assert error < 4 / samples**0.5  # measured 0.028-0.041 at S=1000 over seeds 0-3; 0.126 bounds 3× that


# -- HuggingFace models and batches ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_hf_model_with_dict_batches_is_exact(kind):
    model = tiny_hf()
    reference = REFERENCES[kind](model)
    operator = OPERATORS[kind](model, next_token_cross_entropy, dict_batches([4, 2]), chunk_size=ALL)
    V = probes(reference.shape[0])
    assert relative_error(operator @ V, reference @ V) < RTOL64


def test_load_hf_model_from_a_config_file_and_a_folder(tmp_path):
    model = tiny_hf()
    assert not model.training and model.config.use_cache is False
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = load_hf_model(tmp_path / "checkpoint", dtype=torch.float64)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**model.config.to_dict(), "n_layer": 2}))
    assert len(load_hf_model(config).transformer.h) == 2
    again = load_hf_model(config)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), load_hf_model(config).parameters()))
    with pytest.raises(UnknownModelError, match="nothing is downloaded"):
        load_hf_model("no-such-model/on-the-hub")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_model(tmp_path / "missing.json")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_hf_overrides_derive_head_dim_as_transformers_does(tmp_path, model_type):
    """Llama's and Mistral's head_dim (hidden_size // num_attention_heads) follows the overridden sizes (and
    Llama's num_key_value_heads, num_attention_heads), from a model type and from a saved config that lists
    the derived values: the model has the parameters transformers builds from the same sizes (head_dim stayed
    128, and the model had about 100 times as many)."""
    transformers = pytest.importorskip("transformers")
    sizes = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8}
    sizes["vocab_size"] = 16
    expected = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **sizes))
    count = sum(p.numel() for p in expected.parameters())
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(transformers.AutoConfig.for_model(model_type).to_dict()))
    for source in (model_type, saved):
        model = load_hf_model(source, overrides=sizes)
        derived = (model.config.head_dim, model.config.num_key_value_heads)
        assert derived == (4, expected.config.num_key_value_heads), source
        assert sum(p.numel() for p in model.parameters()) == count, source
    assert load_hf_model(saved, overrides={**sizes, "head_dim": 2}).config.head_dim == 2


def test_a_smaller_vocabulary_drops_the_special_ids_it_leaves_out(tmp_path):
    """GPT-2's bos/eos id 50256 under vocab_size=100 (a model type, a saved config): set to None instead of a
    transformers warning on stderr per id (which broke the CLI's one-line errors); an id the overrides give is
    kept, and ids inside the smaller vocabulary stay."""
    transformers = pytest.importorskip("transformers")
    sizes = {"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 100}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(transformers.AutoConfig.for_model("gpt2").to_dict()))
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        for source in ("gpt2", saved):
            config = load_hf_model(source, overrides=sizes).config
            assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (None, None, 100), source
        assert load_hf_model("gpt2", overrides={**sizes, "eos_token_id": 7}).config.eos_token_id == 7
        assert load_hf_model("gpt2", overrides={**sizes, "vocab_size": 60000}).config.bos_token_id == 50256
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "token_id" in r], records


def test_broken_hf_checkpoints_are_refused_naming_the_file_and_the_fix(tmp_path):
    """A half-downloaded safetensors file raised safetensors' own error (not a HessopsError: a traceback from the
    command line), weights of other sizes a RuntimeError after a many-line report, a cut config.json a bare JSON
    error naming no file. Each is now a CheckpointError that names the file and what to do."""
    for name, path in broken_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            load_hf_model(path)
        message = str(caught.value)
        assert "\n" not in message and all(part in message for part in BROKEN[name]), (name, message)


# -- bad input -------------------------------------------------------------------------------------------
def test_data_without_counted_tokens_or_labels_is_refused():
    model = tiny_gpt()
    data = dict_batches([6])
    data[0]["labels"] = torch.full((B, T), -100)
    with pytest.raises(EmptyDataError, match="every target in the data equals ignore_index"):
        hessops.Hessian(model, next_token_cross_entropy, data) @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.float64
        )
    unlabeled = [{k: v for k, v in dict_batches([6])[0].items() if k != "labels"}]
    with pytest.raises(TypeError, match="no 'labels'"):
        hessops.GGN(model, next_token_cross_entropy, unlabeled)
    wrong = [(tokens()[0], tokens()[0][:, :-1])]
    with pytest.raises(TargetShapeError, match=r"labels \(6, 5\)"):
        hessops.Hessian(model, next_token_cross_entropy, wrong) @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.float64
        )


# -- the offline corpus ----------------------------------------------------------------------------------
def test_text_blocks_hold_every_byte_of_the_corpus_once():
    from hessops.zoo.text import corpus_documents, load_text

    documents = corpus_documents()
    blocks = load_text(block_size=64)
    assert blocks.vocab_size == 256 and len(documents) >= 10
    assert int(blocks.attention_mask.sum()) == sum(len(d.encode("utf-8")) for d in documents)
    kept = blocks.labels[blocks.labels != -100]
    assert bytes(kept.tolist()).decode("utf-8") == "".join(documents)
    counted = loss_spec(next_token_cross_entropy).batch_weight(blocks.labels, len(blocks))
    assert counted == len(kept) - len(blocks)  # the first token of each block is never a label
    item = load_text(block_size=16, num_blocks=3)[2]
    assert set(item) == {"input_ids", "attention_mask", "labels"} and item["input_ids"].shape == (16,)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        load_text(block_size=1)


def test_a_gpt_on_text_blocks_through_a_loader():
    from hessops.zoo.data import make_loader
    from hessops.zoo.text import load_text

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=4)
    model = GPT(config).eval()
    data = load_text(block_size=16)
    last = int(data.attention_mask.sum(1).lt(16).nonzero()[0])  # a padded block, and the ones before it
    loader = make_loader(torch.utils.data.Subset(data, range(last - 2, last + 1)), batch_size=2)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    hv = hessops.Hessian(model, next_token_cross_entropy, loader) @ v
    whole = hessops.Hessian(model, next_token_cross_entropy, [data[last - 2 : last + 1]]) @ v
    assert torch.allclose(hv, whole, rtol=1e-4, atol=1e-6)  # float32: batches of 2 + 1 against one of 3


def test_load_text_reads_a_users_file_or_folder_of_txt_files(tmp_path):
    from hessops.errors import CorruptDatasetError, DatasetNotFoundError, EmptyDataError
    from hessops.zoo.text import corpus_documents, load_text

    (tmp_path / "b.txt").write_text("second é", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not read")
    assert corpus_documents(tmp_path) == ["first", "second é"]  # .txt files in name order
    blocks = load_text(tmp_path, block_size=4)
    assert len(blocks) == 2 + 3  # 5 bytes, then 9 ("é" is two): each document's blocks, the last padded
    assert bytes(blocks[2]["input_ids"].tolist()).decode() == "seco" and blocks[4]["attention_mask"].sum() == 1
    assert load_text(tmp_path / "a.txt", block_size=4).input_ids.shape == (2, 4)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(CorruptDatasetError, match="latin1.txt is not UTF-8"):
        load_text(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(DatasetNotFoundError, match="is empty"):  # an unset $FILE, not the current folder
        load_text("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDataError, match="has no .txt files"):
        load_text(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(EmptyDataError, match="holds no text"):
        load_text(tmp_path / "empty")
