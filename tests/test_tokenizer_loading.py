"""load_tokenizer: the tokenizer AutoTokenizer gives, loaded by its named class where that is exact (no PyTorch
import), and by AutoTokenizer wherever the folder leaves the choice to it."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

from flax_bert.data.tokenizer_loading import direct_class_name, load_tokenizer
from flax_bert.data.tokenizer_training import train_tokenizer

TEXTS = ["The lobster is blue; it turns red when cooked.", "naïve café – 東京 \t tabs\nnewline", "a <mask> here"]
PAIRS = ["It sold well.", "second part", "[MASK] again"]


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def trained(request, tmp_path_factory):
    from flax_bert.data import corpus

    documents = corpus.load_builtin_corpus(tmp_path_factory.mktemp("corpus"))
    folder = tmp_path_factory.mktemp(request.param) / "tokenizer"
    train_tokenizer(documents[::8], kind=request.param, vocab_size=600, output_dir=folder, model_max_length=96)
    return folder


def saved_files(tokenizer, folder) -> dict:
    tokenizer.save_pretrained(folder)
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def test_a_trained_tokenizer_loads_as_autotokenizer_loads_it(trained, tmp_path):
    assert direct_class_name(trained) == ("RobertaTokenizer" if "bpe" in str(trained) else "BertTokenizer")
    ours, auto = load_tokenizer(trained), AutoTokenizer.from_pretrained(trained)
    assert type(ours) is type(auto)
    assert (len(ours), ours.model_max_length, ours.all_special_tokens) == (
        len(auto), auto.model_max_length, auto.all_special_tokens)
    assert ours(TEXTS, PAIRS) == auto(TEXTS, PAIRS)
    assert ours(TEXTS, padding="max_length", max_length=40, truncation=True) == auto(
        TEXTS, padding="max_length", max_length=40, truncation=True)
    assert saved_files(ours, tmp_path / "ours") == saved_files(auto, tmp_path / "auto")
    # options reach the class as they reach AutoTokenizer; the ones AutoTokenizer consumes are not kept
    options = {"model_max_length": 32, "use_fast": True, "trust_remote_code": False}  # as the train command passes
    ours, auto = load_tokenizer(trained, **options), AutoTokenizer.from_pretrained(trained, **options)
    assert ours.model_max_length == 32
    assert saved_files(ours, tmp_path / "ours_options") == saved_files(auto, tmp_path / "auto_options")


def test_folders_that_leave_the_choice_to_autotokenizer_go_to_it(trained, tmp_path):
    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(trained, folder)
        change(folder)
        return folder

    def edit_config(**changes):
        def change(folder):
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config.update(changes)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return change

    model_folder = variant("with_model_config", lambda f: (f / "config.json").write_text('{"model_type": "bert"}'))
    assert direct_class_name(model_folder) is None  # a model's type may pick another class
    assert direct_class_name(variant("custom_code", edit_config(auto_map={"AutoTokenizer": ["x.Y", None]}))) is None
    assert direct_class_name(variant("other_class", edit_config(tokenizer_class="GPT2Tokenizer"))) is None
    assert direct_class_name(tmp_path / "missing") is None and direct_class_name("roberta-base") is None
    not_json = variant("broken", lambda f: (f / "tokenizer_config.json").write_text("{"))
    assert direct_class_name(not_json) is None
    assert type(load_tokenizer(model_folder)) is type(AutoTokenizer.from_pretrained(model_folder))
