import pickle

import pytest
import torch

from metaflowlib.artifacts import load_checkpoint, load_meta_knowledge, save_checkpoint, save_meta_knowledge
from metaflowlib.errors import DataError
from metaflowlib.methods import ProtoNet


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_meta_knowledge_round_trip(tmp_path):
    method = ProtoNet(hidden=8, distance="cosine")
    torch.nn.init.normal_(method.embedding.blocks[0].weight)
    save_meta_knowledge(method, tmp_path / "omega", {"image_size": 28})
    loaded, config = load_meta_knowledge(tmp_path / "omega")
    assert config["extra"]["image_size"] == 28 and loaded.distance == "cosine"
    for (k, a), (_, b) in zip(method.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_planted_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_meta_knowledge(ProtoNet(hidden=8), tmp_path / "omega")
    (tmp_path / "omega" / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DataError, match="not a valid safetensors file"):
        load_meta_knowledge(tmp_path / "omega")
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_meta_knowledge(ProtoNet(hidden=8), tmp_path / "omega")
    config = (tmp_path / "omega" / "config.json").read_text().replace('"hidden": 8', '"hidden": 16')
    (tmp_path / "omega" / "config.json").write_text(config)
    with pytest.raises(Exception, match="size mismatch|does not match"):
        load_meta_knowledge(tmp_path / "omega")


def test_unknown_kind_is_refused(tmp_path):
    save_meta_knowledge(ProtoNet(hidden=8), tmp_path / "omega")
    path = tmp_path / "omega" / "config.json"
    path.write_text(path.read_text().replace('"protonet"', '"nope"'))
    with pytest.raises(DataError, match="'kind' must be one of"):
        load_meta_knowledge(tmp_path / "omega")


def test_checkpoint_round_trip_keeps_types(tmp_path):
    method = ProtoNet(hidden=4)
    optimizer = torch.optim.Adam(method.parameters())
    method.features(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "step": 7, "rng": torch.get_rng_state(), "history": [{"a": 1.5}]}
    save_checkpoint(state, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded["step"] == 7 and loaded["history"] == [{"a": 1.5}]
    assert torch.equal(loaded["rng"], state["rng"])
    assert set(loaded["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys survive
    assert load_checkpoint(tmp_path / "none") is None


def test_damaged_or_planted_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint({"step": 3, "rng": torch.get_rng_state()}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DataError, match="state.safetensors is not a valid safetensors file"):
        load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "PWNED").exists()

    save_checkpoint({"step": 3, "rng": torch.get_rng_state()}, tmp_path / "ckpt")
    skeleton = tmp_path / "ckpt" / "state.json"
    text = skeleton.read_text()
    skeleton.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"checkpoint .*ckpt is damaged \(JSONDecodeError.*delete it to start afresh"):
        load_checkpoint(tmp_path / "ckpt")
    skeleton.write_text(text.replace("state.rng", "state.gone"))  # names a tensor the file does not hold
    with pytest.raises(DataError, match=r"is damaged \(KeyError"):
        load_checkpoint(tmp_path / "ckpt")
