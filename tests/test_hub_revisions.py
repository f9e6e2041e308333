"""--hub_revision_steps: intermediate checkpoints pushed as branches of the Hub repository, the final model to
main, with the Hub client stubbed at its boundary (huggingface_hub.HfApi): the branch names, what each push holds,
and a failed push that names the command retrying it while training goes on."""
import json
import logging
import pathlib

import pytest

from flax_bert import cli


class RecordingHub:
    """huggingface_hub.HfApi's calls that an upload makes, recorded; `failing` branches raise on upload."""
    pushes: list = []
    branches: list = []
    failing: set = set()

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=False, exist_ok=False):
        assert exist_ok

    def create_branch(self, repo_id, branch, exist_ok=False):
        assert exist_ok
        RecordingHub.branches.append(branch)

    def upload_folder(self, repo_id, folder_path, allow_patterns, revision=None, commit_message=""):
        if revision in RecordingHub.failing:
            raise ConnectionError("the network went away")
        folder = pathlib.Path(folder_path)
        files = sorted(p.name for p in folder.iterdir() if any(p.match(pattern) for pattern in allow_patterns))
        card = (folder / "README.md").read_text()
        RecordingHub.pushes.append({"repo": repo_id, "revision": revision, "files": files, "card": card})


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHub.pushes, RecordingHub.branches, RecordingHub.failing = [], [], set()
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return RecordingHub


def train(tmp_path, *extra):
    return cli.main(["train", "tiny", "--max_steps", "4", "--logging_steps", "2", "--save_steps", "0",
                     "--max_train_samples", "200", "--do_eval", "false", "--tokenizer_vocab_size", "600",
                     "--max_seq_length", "32", "--per_device_train_batch_size", "1", "--progress_bar", "false",
                     "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"),
                     "--push_to_hub", "--hub_model_id", "you/tiny", *extra])


def test_every_n_steps_a_branch_named_after_the_step_and_the_final_model_on_main(hub, tmp_path):
    assert train(tmp_path, "--hub_revision_steps", "2") == 0
    assert [push["revision"] for push in hub.pushes] == ["step-0000002", "step-0000004", None]
    assert hub.branches == ["step-0000002", "step-0000004"]
    for push in hub.pushes:
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(push["files"])
    assert "steps: 2;" in hub.pushes[0]["card"] and "steps: 4;" in hub.pushes[1]["card"]
    # the pushed steps were saved: a failed upload's retry exports them
    assert {2, 4} <= {int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()}


def test_a_failed_revision_push_names_its_retry_and_training_goes_on(hub, tmp_path, caplog):
    hub.failing = {"step-0000002"}
    with caplog.at_level(logging.WARNING, logger="flax_bert"):
        assert train(tmp_path, "--hub_revision_steps", "2") == 0
    assert [push["revision"] for push in hub.pushes] == ["step-0000004", None]
    retry = (f"flax-bert export {tmp_path / 'run'} --step 2 --to {tmp_path / 'run'}-step-0000002 --overwrite "
             f"--push_to_hub --hub_model_id you/tiny --hub_revision step-0000002")
    assert "step 2 not on the Hub, training goes on" in caplog.text and retry in caplog.text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["architectures"]  # the run ended with its export
    hub.failing = set()  # the retry, as printed, pushes step 2 to its branch
    assert cli.main(retry.split()[1:]) == 0
    assert hub.pushes[-1]["revision"] == "step-0000002" and "steps: 2;" in hub.pushes[-1]["card"]


def test_revisions_need_push_to_hub(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "tiny", "--output_dir", str(tmp_path / "run"), "--hub_revision_steps", "2"])
    assert "--hub_revision_steps needs --push_to_hub" in capsys.readouterr().err
