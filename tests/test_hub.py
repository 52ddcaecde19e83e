"""The Hugging Face Hub features against a local Hub (tests/hub_server.py) driven by the real huggingface_hub client:
push from the trainer and the CLI, pull, hf:// references, resume from the Hub, and one message per failure."""

import csv
import hashlib
import json
import os
import socket

import huggingface_hub.utils._http
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open

from hub_server import ALICE_TOKEN, FakeHub
from para_trainer import cli, hub
from para_trainer.training.args import ArgsError, parse_args
from para_trainer.hub import HubError, HubRef, parse_ref, parse_resume, pull, push, resolve_path
from para_trainer.training.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "para_trainer", "example_data", "train")


def train_args(out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", DATA, "--caption_extension",
            ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "run", "--network_dim", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "7", *extra]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def set_online(monkeypatch, online: bool) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (conftest sets it): change both
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if online else "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not online)


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # para_trainer.hub passes it to the client at each call
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # a fresh cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local hub speaks git-LFS, not Xet
    set_online(monkeypatch, True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished local run: run.safetensors, run_lora.safetensors and two samples (written once, no Hub)."""
    out = tmp_path_factory.mktemp("trained")
    prompts = out / "prompts.txt"
    prompts.write_text("a photo of sks toy, on a blue background --w 64 --h 64 --d 1 --s 2\n"
                       "a photo of sks toy on the beach --w 64 --h 64 --d 2 --s 2\n")
    assert train_main(train_args(out, "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")) == 0
    return out


# --------------------------------------------------------------------------------------------------
# References


def test_hub_references_parse_with_types_revisions_and_paths():
    assert parse_ref("hf://alice/toy/run.safetensors") == HubRef("alice/toy", "model", None, "run.safetensors")
    in_sub = HubRef("alice/toy", "model", "v1", "sub/run.safetensors")
    assert parse_ref("hf://alice/toy@v1/sub/run.safetensors") == in_sub
    assert parse_ref("hf://alice/toy/sub/run.safetensors@v1") == in_sub
    assert parse_ref("hf://datasets/alice/data@refs/pr/3/a.png") == HubRef("alice/data", "dataset", "refs/pr/3",
                                                                          "a.png")
    assert parse_ref("alice/toy@main") == HubRef("alice/toy", "model", "main", "")
    assert parse_ref("hf://alice/toy/file@1") == HubRef("alice/toy", "model", None, "file@1")  # no extension: literal
    assert str(HubRef("alice/data", "dataset", "v2", "x/y.bin")) == "hf://datasets/alice/data@v2/x/y.bin"
    # sd-scripts' --resume with --resume_from_huggingface: USER/REPO/PATH[:REVISION[:REPO_TYPE]]
    assert parse_resume("alice/toy/run-state:v1:dataset") == HubRef("alice/toy", "dataset", "v1", "run-state")
    assert parse_resume("alice/toy/out/run-state") == HubRef("alice/toy", "model", None, "out/run-state")
    for bad in ("hf://alice", "hf://alice/toy@", "hf://a lice/toy/x.safetensors"):
        with pytest.raises(HubError, match="hf://"):
            parse_ref(bad)
    assert resolve_path("output/run.safetensors") == "output/run.safetensors"  # not a reference: unchanged


def test_hub_options_are_checked_before_anything_runs():
    for argv, message in [
        (["--async_upload"], "--async_upload has an effect only together with --huggingface_repo_id"),
        (["--huggingface_repo_id", "a/b", "--save_state_to_huggingface"], "--save_state or --save_state_on_train"),
        (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume USER/REPO/STATE_FOLDER"),
        (["--huggingface_repo_id", "a/b", "--huggingface_repo_visibility", "secret"], "use public or private"),
        (["--huggingface_repo_id", "a/b/c"], "write USER/REPO"),
    ]:
        with pytest.raises(ArgsError, match=message):
            parse_args(argv)
    args = parse_args(["--huggingface_repo_id", "alice/toy", "--async_upload", "--huggingface_repo_type", "model"])
    assert args.huggingface_repo_id == "alice/toy" and args.async_upload


# --------------------------------------------------------------------------------------------------
# Push and pull


def test_cli_push_then_pull_round_trips_byte_identical_with_a_model_card(hub_server, trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["push", str(trained / "run.safetensors"), "alice/toy", "--message", "first upload"])
    assert done.value.code == 0
    files = hub_server.files("alice/toy")
    samples = sorted(name for name in os.listdir(trained / "sample"))
    assert set(files) == {".gitattributes", "README.md", "run.safetensors", "run_lora.safetensors",
                          *(f"sample/{name}" for name in samples)}
    assert hub_server.commit_messages("alice/toy") == ["initial commit", "first upload"]  # one commit
    assert not hub_server.repos[("model", "alice/toy")].private  # push's default, --private otherwise

    with pytest.raises(SystemExit) as done:
        cli.main(["pull", "alice/toy", "-o", str(tmp_path / "pulled")])
    assert done.value.code == 0
    for name in ["run.safetensors", "run_lora.safetensors", *(f"sample/{s}" for s in samples)]:
        assert sha256(tmp_path / "pulled" / name) == sha256(trained / name), name

    card = ModelCard.load(tmp_path / "pulled" / "README.md")
    assert card.data.license == "creativeml-openrail-m"  # the SD1 base's licence
    assert {"para", "lora", "stable-diffusion", "text-to-image"} <= set(card.data.tags)
    assert card.data.instance_prompt == "sks toy"  # the DreamBooth folder 5_sks toy
    widget = card.data.to_dict()["widget"]
    assert {item["output"]["url"] for item in widget} == {f"sample/{s}" for s in samples}
    assert "a photo of sks toy on the beach" in {item["text"] for item in widget}
    for text in ("<lora:run_lora:1>", "ComfyUI/models/loras", 'load_lora_weights("alice/toy", '
                 'weight_name="run_lora.safetensors")', "| steps | `2` |", "| rank (network_dim) | `2` |"):
        assert text in card.text, text


def test_push_to_a_branch_and_pull_one_file_of_a_revision(hub_server, trained, tmp_path):
    push(trained / "run.safetensors", "alice/toy", model_card=False)
    result = push([(str(trained / "run_lora.safetensors"), "v1/only.safetensors")], "alice/toy", revision="v1",
                  message="on v1")
    assert result.revision == "v1" and result.files == ["v1/only.safetensors"]
    assert "v1/only.safetensors" in hub_server.files("alice/toy", revision="v1")
    assert "v1/only.safetensors" not in hub_server.files("alice/toy")
    written = pull("alice/toy@v1", ["v1/only.safetensors"], str(tmp_path / "out"))
    assert written == [str(tmp_path / "out" / "v1" / "only.safetensors")]
    assert sha256(written[0]) == sha256(trained / "run_lora.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["v1"]
    with pytest.raises(HubError, match=r"no file 'v1/only.safetensors' in model repository alice/toy at revision "
                                       r"'main'"):
        pull("alice/toy", ["v1/only.safetensors"], str(tmp_path / "out2"))
    # a dataset repository, named with hf://datasets/...
    push(trained / "run_lora.safetensors", "alice/toy", repo_type="dataset")
    from_dataset = resolve_path("hf://datasets/alice/toy/run_lora.safetensors")
    assert sha256(from_dataset) == sha256(trained / "run_lora.safetensors")


def test_hf_references_work_in_inspect_and_network_weights(hub_server, trained, tmp_path, capsys):
    push(trained / "run.safetensors", "alice/toy")
    with pytest.raises(SystemExit) as done:
        cli.main(["inspect", "hf://alice/toy/run.safetensors", "--json"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "native PaRa" and report["hashes"]["sha256"] == sha256(trained / "run.safetensors")

    # one step at a negligible learning rate: the adapter written is the one pulled through hf://
    out = tmp_path / "continued"
    assert train_main(train_args(out, "--network_weights", "hf://alice/toy/run.safetensors", "--learning_rate",
                                 "1e-12", steps=1)) == 0
    pulled, written = tensors(trained / "run.safetensors"), tensors(out / "run.safetensors")
    assert pulled.keys() == written.keys()
    assert all(torch.allclose(pulled[k].float(), written[k].float(), atol=1e-6) for k in pulled)
    fresh_dir = tmp_path / "fresh"
    assert train_main(train_args(fresh_dir, "--learning_rate", "1e-12", steps=1)) == 0
    fresh = tensors(fresh_dir / "run.safetensors")
    assert not all(torch.allclose(pulled[k].float(), fresh[k].float(), atol=1e-6) for k in pulled)


# --------------------------------------------------------------------------------------------------
# The trainer's sd-scripts options


def test_trainer_pushes_saves_state_and_resumes_from_the_hub(hub_server, tmp_path):
    out = tmp_path / "run1"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks toy --w 64 --h 64 --d 1 --s 2\n")
    assert train_main(train_args(out, "--huggingface_repo_id", "alice/run", "--huggingface_path_in_repo", "runs/a",
                                 "--huggingface_repo_visibility", "public", "--save_every_n_steps", "1",
                                 "--save_state_on_train_end", "--save_state_to_huggingface",
                                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")) == 0
    files = hub_server.files("alice/run")
    final = {"runs/a/run.safetensors", "runs/a/run_lora.safetensors", "runs/a/run-state/train_state.json",
             "runs/a/run-state/network.safetensors", "README.md", "runs/a/run-step00000001.safetensors"}
    assert final <= set(files)
    assert any(name.startswith("runs/a/sample/run_000002_00_") for name in files)
    for name in ("run.safetensors", "run_lora.safetensors", "run-state/optimizer.pt"):
        assert files[f"runs/a/{name}"] == (out / name).read_bytes()
    repo = hub_server.repos[("model", "alice/run")]
    assert not repo.private  # --huggingface_repo_visibility public (sd-scripts' default is private)
    assert len(repo.commits) == 3  # created, the step-1 save, the final push
    card = ModelCard.load(resolve_path("hf://alice/run/README.md"))
    assert 'subfolder="runs/a"' in card.text and card.data.widget[0]["output"]["url"].startswith("runs/a/sample/")

    # sd-scripts' --resume USER/REPO/PATH with --resume_from_huggingface: continues at step 2
    resumed = tmp_path / "run2"
    assert train_main(train_args(resumed, "--resume", "alice/run/runs/a/run-state", "--resume_from_huggingface",
                                 steps=3)) == 0
    rows = list(csv.DictReader(open(resumed / "run_train_log.csv")))
    assert [int(row["step"]) for row in rows] == [3]
    with safe_open(str(resumed / "run.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_async_upload_failures_are_reported_at_the_end(hub_server, tmp_path, capsys):
    hub_server.fail("POST", "/commit/", 400, "simulated outage", times=1)  # the step-1 upload fails
    out = tmp_path / "run"
    code = train_main(train_args(out, "--huggingface_repo_id", "alice/async", "--async_upload",
                                 "--save_every_n_steps", "1", steps=3))
    error = capsys.readouterr().err
    assert code == 2
    assert "1 upload(s) to alice/async failed" in error and "run-step00000001.safetensors" in error
    assert "simulated outage" in error and f"para-trainer push {out} alice/async" in error
    assert (out / "run.safetensors").is_file() and (out / "run-step00000002.safetensors").is_file()
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]  # the upload's staging is gone
    files = hub_server.files("alice/async")
    assert "run-step00000001.safetensors" not in files
    # the step-2 upload ran in the background (from hard links of the files), and the final push went through
    assert files["run-step00000002_lora.safetensors"] == (out / "run-step00000002_lora.safetensors").read_bytes()
    assert files["run.safetensors"] == (out / "run.safetensors").read_bytes()
    assert hub_server.repos[("model", "alice/async")].private  # sd-scripts' default visibility


def test_a_bare_repo_name_goes_to_the_token_user(hub_server, tmp_path):
    assert train_main(train_args(tmp_path / "run", "--huggingface_repo_id", "bare", steps=1)) == 0
    assert "run.safetensors" in hub_server.files("alice/bare")


# --------------------------------------------------------------------------------------------------
# One message per failure


def test_bad_token_fails_before_training(hub_server, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(train_args(out, "--huggingface_repo_id", "alice/x", "--huggingface_token", "hf_wrong"))
    assert code == 2 and not out.exists()  # nothing was loaded or written
    assert "rejected the token (401: Invalid credentials in Authorization header)" in capsys.readouterr().err
    with pytest.raises(HubError, match="rejected the token"):
        push(__file__, "alice/x", token="hf_wrong")


def test_missing_token_says_how_to_log_in(hub_server, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubError, match="no Hugging Face token found.*hf auth login"):
        push(__file__, "alice/x")


def test_someone_elses_namespace_is_refused(hub_server, trained, tmp_path, capsys):
    # the server itself answers 403 to alice in bob's namespace ...
    with pytest.raises(HfHubHTTPError) as raw:
        HfApi(endpoint=hub_server.url, token=ALICE_TOKEN).create_repo("bob/x")
    assert raw.value.response.status_code == 403
    # ... and para-trainer refuses before training, naming the namespaces the token may write to
    code = train_main(train_args(tmp_path / "run", "--huggingface_repo_id", "bob/x"))
    error = capsys.readouterr().err
    assert code == 2 and "'bob' is someone else's namespace" in error and "'alice', 'alice-team'" in error
    assert ("model", "bob/x") not in hub_server.repos
    push(trained / "run.safetensors", "alice-team/shared")  # an organisation alice can write to
    # a 403 from the Hub during the upload itself (e.g. a token that lost its write access) is explained too
    hub_server.fail("POST", "/commit/", 403, "This token has no write access")
    with pytest.raises(HubError, match=r"may not write to 'alice'.*403: This token has no write access"):
        push(trained / "run.safetensors", "alice/y")


def test_missing_repository_file_and_revision(hub_server, trained):
    push(trained / "run.safetensors", "alice/toy")
    with pytest.raises(HubError, match="model repository alice/nothere not found"):
        resolve_path("hf://alice/nothere/run.safetensors")
    with pytest.raises(HubError, match="no file 'nothere.safetensors' in model repository alice/toy"):
        resolve_path("hf://alice/toy/nothere.safetensors")
    with pytest.raises(HubError, match="revision 'v9' not found in model repository alice/toy"):
        resolve_path("hf://alice/toy@v9/run.safetensors")
    with pytest.raises(HubError, match="dataset repository alice/toy not found"):
        resolve_path("hf://datasets/alice/toy/run.safetensors")
    with pytest.raises(HubError, match="model repository alice/nothere not found"):
        pull("alice/nothere", out_dir=str(trained / "never"))
    with pytest.raises(HubError, match="'run.safetensors' in alice/toy is not a state folder"):
        hub.download_state("alice/toy/run.safetensors")


def test_network_down_is_reported_with_the_address(hub_server, monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    # huggingface_hub retries a download 5 times over 23 s before giving up; skip the waiting, not the retries
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    with pytest.raises(HubError, match=f"cannot reach the Hugging Face Hub at {closed} .*not in the Hugging Face "
                                       "cache; check the network"):
        resolve_path("hf://alice/toy/run.safetensors")
    with pytest.raises(HubError, match=f"cannot reach the Hugging Face Hub at {closed}"):
        push(__file__, "alice/toy")
    assert train_main(train_args(tmp_path / "run", "--huggingface_repo_id", "alice/x")) == 2
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err


def test_offline_uses_the_cache_and_says_when_a_file_is_not_there(hub_server, trained, monkeypatch, tmp_path):
    push(trained / "run.safetensors", "alice/toy")
    online_path = resolve_path("hf://alice/toy/run.safetensors")
    hub_server.stop()
    set_online(monkeypatch, False)
    assert resolve_path("hf://alice/toy/run.safetensors") == online_path  # from the cache, no server needed
    assert sha256(online_path) == sha256(trained / "run.safetensors")
    assert sha256(pull("alice/toy", ["run.safetensors"], str(tmp_path / "p"))[0]) == sha256(online_path)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache .*unset "
                                       "HF_HUB_OFFLINE"):
        resolve_path("hf://alice/toy/run_lora.safetensors")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 forbids talking to the Hub"):
        push(__file__, "alice/toy")
