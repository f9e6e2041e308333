"""Tokenizer training: both kinds train, reload through AutoTokenizer, and round-trip text."""

import json

import pytest
from transformers import AutoTokenizer

from flax_bert.data.sources import DataArgs
from flax_bert.data.tokenizer_training import TokenizerTrainingError, train_tokenizer, train_tokenizer_from_args

SAMPLE = "The lobster, Homarus gammarus, is blue; it turns red when cooked."


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from flax_bert.data import corpus
    documents = corpus.load_builtin_corpus(tmp_path_factory.mktemp("corpus"))
    return documents[::4] + [SAMPLE] * 3  # ~0.5 MB: enough for a 2000-token vocabulary, quick to train


def test_byte_level_bpe_trains_reloads_and_round_trips(texts, tmp_path):
    trained = train_tokenizer(texts, kind="bpe", vocab_size=2000, output_dir=tmp_path / "bpe")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert type(reloaded).__name__.startswith("RobertaTokenizer")
    assert len(reloaded) == len(trained) == 2000
    assert reloaded.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert (reloaded.pad_token_id, reloaded.mask_token_id) == (1, 4)
    ids = reloaded(SAMPLE)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2  # RoBERTa post-processor: <s> ... </s>
    assert reloaded.decode(ids, skip_special_tokens=True) == SAMPLE
    odd = "naïve café – 東京 \t tabs\nnewline"
    assert reloaded.decode(reloaded(odd)["input_ids"], skip_special_tokens=True) == odd  # byte-level: lossless
    tokens = reloaded.convert_ids_to_tokens(reloaded("a <mask> here")["input_ids"])
    assert "<mask>" in tokens and "Ġ" not in tokens  # <mask> strips the space before it, like roberta-base
    config = json.loads((tmp_path / "bpe" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RobertaTokenizer" and config["mask_token"] == "<mask>"


def test_wordpiece_trains_reloads_and_round_trips(texts, tmp_path):
    train_tokenizer(texts, kind="wordpiece", vocab_size=2000, output_dir=tmp_path / "wp")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "wp")
    assert type(reloaded).__name__.startswith("BertTokenizer")
    assert len(reloaded) == 2000
    assert reloaded.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    encoded = reloaded("first part", "second part")
    assert encoded["input_ids"][0] == 2 and encoded["input_ids"].count(3) == 2
    assert encoded["token_type_ids"] == [0] * 4 + [1] * 3  # [CLS] a b [SEP] | c d [SEP]
    ids = reloaded(SAMPLE)["input_ids"]
    decoded = reloaded.decode(ids, skip_special_tokens=True)
    # BERT's decoder re-joins ", ." but puts a space before ";": compare without spaces too
    assert decoded.replace(" ", "") == SAMPLE.lower().replace(" ", "")
    plain = "the lobster, homarus gammarus, is blue."
    assert reloaded.decode(reloaded(plain)["input_ids"], skip_special_tokens=True) == plain
    assert any(token.startswith("##") for token in reloaded.convert_ids_to_tokens(ids))


def test_train_from_data_args_uses_the_same_sources(tmp_path):
    source = tmp_path / "train.txt"
    source.write_text(("alpha beta gamma delta.\n\n" * 50) + SAMPLE + "\n")
    trained = train_tokenizer_from_args(DataArgs(train_file=str(source), cache_dir=str(tmp_path / "cache")),
                                        kind="wordpiece", vocab_size=100, min_frequency=1,
                                        output_dir=tmp_path / "from-args")
    assert trained.tokenize("alpha beta") == ["alpha", "beta"]


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(TokenizerTrainingError, match="no text to train"):
        train_tokenizer(["", "   "], kind="bpe", vocab_size=500, output_dir=tmp_path / "out")
    with pytest.raises(TokenizerTrainingError, match="unknown tokenizer kind"):
        train_tokenizer(["text"], kind="unigram", output_dir=tmp_path / "out")
    with pytest.raises(TokenizerTrainingError, match="too small"):
        train_tokenizer(["text"], kind="bpe", vocab_size=100, output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_train_tokenizer_command_passes_token_to_the_dataset_download_and_never_writes_it(texts, tmp_path,
                                                                                          monkeypatch):
    import datasets

    from flax_bert.cli import train_tokenizer_main

    seen = {}

    def fake_load_dataset(name, config=None, **kwargs):
        seen.update(name=name, token=kwargs.get("token"))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:400]})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "tok"
    assert train_tokenizer_main(["--dataset_name", "someone/private-corpus", "--token", "hf_secret123",
                                 "--vocab_size", "600", "--output_dir", str(out)]) == 0
    assert seen == {"name": "someone/private-corpus", "token": "hf_secret123"}
    assert not any("hf_secret123" in f.read_text(errors="replace") for f in out.iterdir() if f.is_file())
