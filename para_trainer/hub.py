"""Sharing adapters on the Hugging Face Hub: push (one commit, with a model card), pull, hf:// references, and the
trainer's sd-scripts options (--huggingface_repo_id and friends, --resume_from_huggingface, --async_upload).

A Hub reference names a file in a repository, in huggingface_hub's own hf:// URI syntax:

    hf://[datasets/|spaces/]USER/REPO[@REVISION]/PATH/IN/REPO
    hf://alice/toy-para/toy.safetensors            the file on the main branch
    hf://alice/toy-para@v1/toy.safetensors         on a branch, tag or commit (refs/pr/N works too)
    hf://alice/toy-para/toy.safetensors@v1         the same: a revision may also end the reference

Files are fetched through huggingface_hub's cache (HF_HOME or HF_HUB_CACHE), so a second use needs no network,
and with HF_HUB_OFFLINE=1 only the cache is used. The endpoint is HF_ENDPOINT (read at each call); the token is the
one given (--huggingface_token, --token), else HF_TOKEN, else the login saved by `hf auth login`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger("para_trainer")

REPO_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
SPECIAL_REVISION = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
SYNTAX = "hf://[datasets/]USER/REPO[@REVISION]/PATH/IN/REPO"


class HubError(ValueError):
    """A Hub operation that failed; the message says what failed and what to do."""


# --------------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        type_prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        revision = f"@{self.revision}" if self.revision else ""
        return f"hf://{type_prefix}{self.repo_id}{revision}" + (f"/{self.path}" if self.path else "")


def is_hub_ref(text) -> bool:
    return isinstance(text, str) and text.startswith("hf://")


def parse_ref(ref: str) -> HubRef:
    """hf://[TYPE/]USER/REPO[@REV][/PATH] (the hf:// may be left out, as in `pull USER/REPO@REV`)."""
    body = (ref[len("hf://"):] if ref.startswith("hf://") else ref).strip("/")
    repo_type = "model"
    first, _, rest = body.partition("/")
    if first in REPO_TYPE_PREFIXES and rest.count("/") >= 1:
        repo_type, body = REPO_TYPE_PREFIXES[first], rest
    revision, at = None, body.find("@")
    if at != -1 and body[:at].count("/") == 1:  # USER/REPO@REV[/PATH]
        repo_id, rest = body[:at], body[at + 1:]
        special = SPECIAL_REVISION.match(rest)
        revision = special.group() if special else rest.partition("/")[0]
        path = rest[len(revision):].lstrip("/")
    else:
        parts = body.split("/", 2)
        repo_id, path = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else "")
        stem, sep, trailing = path.rpartition("@")
        if sep and trailing and "." in stem.rsplit("/", 1)[-1]:  # PATH/FILE.EXT@REV
            path, revision = stem, trailing
    owner, _, name = repo_id.partition("/")
    if not owner or not name or "/" in name or revision == "":
        raise HubError(f"{ref!r} is not a Hub reference: write {SYNTAX}, e.g. hf://alice/toy-para/toy.safetensors")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"{ref!r}: {repo_id!r} is not a valid repository id ({error})") from None
    return HubRef(repo_id, repo_type, revision, path)


def parse_repo_id(text: str) -> str:
    """USER/REPO (or ORG/REPO) for push; HubError naming the rule when it is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    owner, slash, name = text.partition("/")
    problem = None if slash and owner and name and "/" not in name else "it must be USER/REPO, with one slash"
    if problem is None:
        try:
            validate_repo_id(text)
        except HFValidationError:
            problem = "use letters, digits, '-', '_' and '.' only (at most 96 characters, no '--' or '..')"
    if problem:
        raise HubError(f"push: {text!r} is not a repository id: {problem}, e.g. alice/toy-para")
    return text


def parse_resume(spec: str) -> HubRef:
    """sd-scripts' --resume with --resume_from_huggingface: USER/REPO/PATH[:REVISION[:REPO_TYPE]], or an hf:// ref."""
    if is_hub_ref(spec):
        return parse_ref(spec)
    location, revision, repo_type = (spec.split(":") + [None, None])[:3]
    ref = parse_ref(location)
    if repo_type not in (None, "", *URL_PREFIXES):
        raise HubError(f"--resume {spec}: repository type {repo_type!r} is not model, dataset or space")
    return HubRef(ref.repo_id, repo_type or ref.repo_type, revision or ref.revision, ref.path)


# --------------------------------------------------------------------------------------------------
# Settings read at each call (huggingface_hub reads its environment once, at import)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def _where() -> str:
    from huggingface_hub import constants

    return _endpoint() or constants.ENDPOINT


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=token or None)


# --------------------------------------------------------------------------------------------------
# Errors: one message per failure


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _is_network_error(error: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    names = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError",
             "RemoteProtocolError", "ConnectionError"}
    return any(not isinstance(e, OfflineModeIsEnabled) and (isinstance(e, (ConnectionError, TimeoutError))
                                                              or type(e).__name__ in names) for e in _chain(error))


def _root_cause(error: BaseException) -> str:
    last = list(_chain(error))[-1]
    return f"{type(last).__name__}: {last}".splitlines()[0]


def _server_message(error) -> str:
    response = getattr(error, "response", None)
    message = getattr(error, "server_message", None) or (response is not None and
                                                         response.headers.get("X-Error-Message"))
    return message or str(error).splitlines()[0]


def hub_error(error: Exception, what: str, ref: HubRef | None = None, writing: bool = False) -> HubError:
    """huggingface_hub's exception for `what` (a reference or an action) as one HubError message."""
    from huggingface_hub import errors

    if isinstance(error, HubError):
        return error
    repo = f"{ref.repo_type} repository {ref.repo_id}" if ref else "the repository"
    revision = ref.revision if ref and ref.revision else "main"
    if isinstance(error, errors.LocalTokenNotFoundError):
        return HubError(f"{what}: no Hugging Face token found; pass --huggingface_token (--token for push), set "
                        "HF_TOKEN, or log in once with `hf auth login`")
    offline_error = any(isinstance(e, errors.OfflineModeIsEnabled) for e in _chain(error))
    if offline_error or (isinstance(error, errors.LocalEntryNotFoundError) and _offline()):
        if writing:
            return HubError(f"{what}: HF_HUB_OFFLINE=1 forbids talking to the Hub; unset it to upload")
        return HubError(f"{what}: HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache "
                        f"({_cache_dir() or 'the default cache'}); unset HF_HUB_OFFLINE once to download it")
    if _is_network_error(error) or isinstance(error, errors.LocalEntryNotFoundError):
        cached = "" if writing else " and it is not in the Hugging Face cache"
        return HubError(f"{what}: cannot reach the Hugging Face Hub at {_where()} ({_root_cause(error)}){cached}; "
                        "check the network connection (and HF_ENDPOINT if you set it)")
    if isinstance(error, errors.RevisionNotFoundError):
        return HubError(f"{what}: revision {revision!r} not found in {repo}; check the branch, tag or commit")
    if isinstance(error, errors.EntryNotFoundError):
        path = ref.path if ref and ref.path else "the file"
        listing = f"{_where()}/{URL_PREFIXES[ref.repo_type]}{ref.repo_id}/tree/{revision}" if ref else "the Hub"
        return HubError(f"{what}: no file {path!r} in {repo} at revision {revision!r}; check the path (the files "
                        f"are listed at {listing})")
    if isinstance(error, errors.RepositoryNotFoundError):
        return HubError(f"{what}: {repo} not found; check its name and type (hf://datasets/... for a dataset), "
                        "and for a private repository a token that can read it")
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
        status, message = error.response.status_code, _server_message(error)
        if status == 401:
            return HubError(f"{what}: the Hugging Face Hub rejected the token (401: {message}); pass a valid token "
                            "with --huggingface_token, set HF_TOKEN, or log in again with `hf auth login`")
        if status == 403:
            namespace = ref.repo_id.split("/")[0] if ref else "this namespace"
            return HubError(f"{what}: the token may not write to {namespace!r} (403: {message}); push to a repository "
                            "under your own name or an organisation you can write to, with a write token")
        return HubError(f"{what}: the Hub answered {status}: {message}")
    return HubError(f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


# --------------------------------------------------------------------------------------------------
# Downloads


def resolve_path(ref: str, token: str | None = None) -> str:
    """The local path of a file: an hf:// reference is downloaded through the Hugging Face cache (offline with
    HF_HUB_OFFLINE=1: the cached copy, else HubError); any other string is returned unchanged."""
    if not is_hub_ref(ref):
        return ref
    parsed = parse_ref(ref)
    if not parsed.path:
        raise HubError(f"{ref}: name a file in the repository: {SYNTAX}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(parsed.repo_id, parsed.path, repo_type=parsed.repo_type, revision=parsed.revision,
                               cache_dir=_cache_dir(), endpoint=_endpoint(), token=token or None,
                               local_files_only=_offline())
    except Exception as error:
        raise hub_error(error, ref, parsed) from None


def _snapshot(ref: HubRef, patterns: list[str] | None, token: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, allow_patterns=patterns,
                                 cache_dir=_cache_dir(), endpoint=_endpoint(), token=token or None,
                                 local_files_only=_offline())
    except Exception as error:
        raise hub_error(error, str(ref), ref) from None


def _copy(source: str, destination: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-pull-", dir=os.path.dirname(os.path.abspath(destination)))
    os.close(handle)
    try:
        shutil.copyfile(source, temp)  # follows the cache's symlink to the blob
        os.replace(temp, destination)
    except BaseException:
        os.remove(temp)
        raise


def pull(repo_ref: str, files: list[str] | None = None, out_dir: str = ".", token: str | None = None) -> list[str]:
    """Download FILES (default: the whole repository but .gitattributes) of USER/REPO[@REV] (or an hf:// ref) into
    out_dir, keeping their paths in the repository; returns the local paths. Everything goes through the cache."""
    ref = parse_ref(repo_ref)
    wanted = list(files or []) + ([ref.path] if ref.path else [])
    written = []
    if wanted:
        for path in wanted:
            file_ref = HubRef(ref.repo_id, ref.repo_type, ref.revision, path.strip("/"))
            local = resolve_path(str(file_ref), token)
            written.append(os.path.join(out_dir, *file_ref.path.split("/")))
            _copy(local, written[-1])
        return written
    snapshot = _snapshot(ref, None, token)
    for folder, _, names in os.walk(snapshot):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(folder, name), snapshot)
            if relative != ".gitattributes":
                written.append(os.path.join(out_dir, relative))
                _copy(os.path.join(folder, name), written[-1])
    return written


def download_state(spec: str, token: str | None = None) -> str:
    """A --save_state folder on the Hub (sd-scripts' USER/REPO/PATH[:REVISION[:REPO_TYPE]] or an hf:// ref), as a
    local folder in the cache."""
    ref = parse_resume(spec)
    if not ref.path:
        raise HubError(f"--resume {spec}: name the state folder in the repository: USER/REPO/FOLDER[:REVISION]")
    folder = os.path.join(_snapshot(ref, [f"{ref.path}/*"], token), *ref.path.split("/"))
    if not os.path.isfile(os.path.join(folder, "train_state.json")):
        raise HubError(f"--resume {spec}: {ref.path!r} in {ref.repo_id} is not a state folder written by "
                       "--save_state (no train_state.json)")
    return folder


# --------------------------------------------------------------------------------------------------
# Uploads


def check_token(token: str | None = None) -> dict:
    """whoami: the token's user, organisations and role (HubError for a missing or rejected token)."""
    try:
        return _api(token).whoami()
    except Exception as error:
        raise hub_error(error, f"checking the Hugging Face token at {_where()}", writing=True) from None


def prepare_repo(repo_id: str, repo_type: str = "model", private: bool = True, token: str | None = None,
                 revision: str | None = None) -> str:
    """Check the token may write to repo_id's namespace, create the repository (and branch) if missing; returns
    the user name. Called before training, so a bad token or namespace fails in seconds."""
    ref = HubRef(parse_ref(repo_id).repo_id, repo_type, revision)
    what = f"pushing to {ref.repo_id}"
    if _offline():
        raise HubError(f"{what}: HF_HUB_OFFLINE=1 forbids talking to the Hub; unset it to upload")
    who = check_token(token)
    user, namespace = who.get("name"), ref.repo_id.split("/")[0]
    roles = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs", [])}
    if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubError(f"{what}: the token of {user!r} is read-only; create a token with write access")
    if namespace != user and (namespace not in roles or roles[namespace] == "read"):
        raise HubError(f"{what}: {namespace!r} is someone else's namespace: the token of {user!r} may write only to "
                       f"{', '.join(repr(n) for n in [user, *roles] if roles.get(n) != 'read')}; use "
                       f"{user}/{ref.repo_id.split('/')[1]}")
    api = _api(token)
    try:
        api.create_repo(ref.repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(ref.repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    except Exception as error:
        raise hub_error(error, what, ref, writing=True) from None
    return user


def _is_native_para(path: str) -> bool:
    return path.endswith(".safetensors") and _metadata(path).get("ss_network_module") == "networks.para"


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not a safetensors file we can read: no metadata
        return {}


def _companions(adapter: str) -> list[tuple[str, str]]:
    """What goes with a native adapter file: its LoRA export and the samples of its run, as (local, relative)."""
    stem, extension = os.path.splitext(adapter)
    found = []
    if os.path.isfile(f"{stem}_lora{extension}"):
        found.append((f"{stem}_lora{extension}", os.path.basename(f"{stem}_lora{extension}")))
    name = _metadata(adapter).get("ss_output_name")
    samples = os.path.join(os.path.dirname(os.path.abspath(adapter)), "sample")
    if os.path.isdir(samples):
        for image in sorted(os.listdir(samples)):
            if image.endswith(".png") and (not name or name == "None" or image.startswith(f"{name}_")):
                found.append((os.path.join(samples, image), f"sample/{image}"))
    return found


def _collect(paths, path_in_repo: str | None) -> dict[str, str]:
    """{path in repo: local file}: a file goes to PREFIX/NAME with its companions, a folder's contents to PREFIX/,
    a (local, path in repo) pair where it says."""
    prefix = (path_in_repo or "").strip("/")
    join = lambda relative: f"{prefix}/{relative}" if prefix else relative  # noqa: E731
    entries: dict[str, str] = {}
    for item in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        local, target = (str(item[0]), item[1].strip("/")) if isinstance(item, tuple) else (str(item), None)
        if os.path.isdir(local):
            base = target if target is not None else prefix
            for folder, dirs, names in os.walk(local):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    relative = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
                    entries[f"{base}/{relative}" if base else relative] = os.path.join(folder, name)
        elif os.path.isfile(local):
            entries[target or join(os.path.basename(local))] = local
            if _is_native_para(local):
                for companion, relative in _companions(local):
                    entries.setdefault(join(relative), companion)
        else:
            raise HubError(f"push: {local} not found")
    return entries


@dataclass
class PushResult:
    repo_id: str
    repo_type: str
    revision: str
    commit_oid: str
    commit_url: str
    files: list[str] = field(default_factory=list)  # paths in the repository


def push(paths, repo_id: str, revision: str | None = None, private: bool = False, message: str | None = None,
         token: str | None = None, repo_type: str = "model", path_in_repo: str | None = None,
         model_card=True, base_model: str | None = None) -> PushResult:
    """Upload files and folders to repo_id in ONE commit, creating the repository (and branch) if needed.

    A native PaRa file brings its LoRA export (NAME_lora.safetensors) and its run's samples (sample/NAME_*.png);
    a folder uploads its contents. model_card: True builds README.md from the newest native adapter's metadata
    (unless a README.md is uploaded), False leaves the card alone, a str or ModelCard is used as README.md.
    """
    from huggingface_hub import CommitOperationAdd

    entries = _collect(paths, path_in_repo)
    if not entries:
        raise HubError("push: nothing to upload (empty folder?)")
    ref = HubRef(parse_repo_id(repo_id), repo_type, revision)
    prepare_repo(ref.repo_id, repo_type, private, token, revision)
    operations = [CommitOperationAdd(path_in_repo=target, path_or_fileobj=local) for target, local in entries.items()]
    adapters = [local for local in entries.values() if _is_native_para(local)]
    if model_card is True and adapters and "README.md" not in entries:
        model_card = build_model_card(entries, ref.repo_id, base_model)
    if model_card is not True and model_card:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(model_card).encode()))
    main = _main_adapter(adapters) if adapters else next(iter(entries.values()))
    message = message or f"para-trainer: upload {os.path.basename(main)}" + \
        (f" and {len(operations) - 1} more files" if len(operations) > 1 else "")
    try:
        info = _api(token).create_commit(ref.repo_id, operations, commit_message=message, repo_type=repo_type,
                                         revision=revision)
    except Exception as error:
        raise hub_error(error, f"pushing to {ref.repo_id}", ref, writing=True) from None
    return PushResult(ref.repo_id, repo_type, revision or "main", info.oid, str(info.commit_url),
                      [op.path_in_repo for op in operations])


# --------------------------------------------------------------------------------------------------
# The model card


LICENSES = {"sd_v1": "creativeml-openrail-m", "sd_v2": "openrail++", "sd_v2_v": "openrail++",
            "sdxl_base_v1-0": "openrail++"}
BASE_NAMES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x (512)",
              "sd_v2_v": "Stable Diffusion 2.x (768-v)", "sdxl_base_v1-0": "Stable Diffusion XL", "flux1": "FLUX.1"}
SETTINGS = [("ss_base_model_version", "base model version"), ("ss_sd_model_name", "base model"),
            ("ss_network_module", "network module"), ("ss_network_dim", "rank (network_dim)"),
            ("ss_network_alpha", "network_alpha"), ("ss_network_args", "network_args"), ("ss_steps", "steps"),
            ("ss_epoch", "epochs"), ("ss_num_train_images", "training images (with repeats)"),
            ("ss_num_reg_images", "regularisation images"), ("ss_resolution", "resolution"),
            ("ss_total_batch_size", "total batch size"), ("ss_learning_rate", "learning rate"),
            ("ss_unet_lr", "U-Net learning rate"), ("ss_text_encoder_lr", "text encoder learning rate"),
            ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "lr scheduler"), ("ss_lr_warmup_steps", "warmup steps"),
            ("ss_mixed_precision", "mixed precision"), ("ss_noise_offset", "noise offset"),
            ("ss_min_snr_gamma", "min SNR gamma"), ("ss_clip_skip", "clip skip"), ("ss_seed", "seed")]


def _main_adapter(adapters: list[str]) -> str:
    """The newest adapter: most steps, then a final name (no -step/-epoch suffix), then the latest file."""
    def rank(path):
        steps = _metadata(path).get("ss_steps", "0")
        intermediate = bool(re.search(r"-(step\d+|\d{6})$", os.path.splitext(os.path.basename(path))[0]))
        return int(steps) if steps.isdigit() else 0, not intermediate, os.path.getmtime(path)
    return max(adapters, key=rank)


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    import json

    if metadata.get("modelspec.trigger_phrase"):
        return [metadata["modelspec.trigger_phrase"]]
    words = []
    try:
        for folder in json.loads(metadata.get("ss_dataset_dirs") or "{}"):
            words.append(re.sub(r"^\d+_", "", folder))  # DreamBooth folder "5_sks toy" -> "sks toy"
        for dataset in json.loads(metadata.get("ss_datasets") or "[]"):
            words += [s.get("class_tokens") for s in dataset.get("subsets", []) if s.get("class_tokens")]
    except (ValueError, AttributeError, TypeError):
        pass
    return list(dict.fromkeys(w for w in words if w))


def _sample_prompt(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            parameters = image.info.get("parameters") or ""
    except OSError:
        return None
    return re.split(r"\n(?:Negative prompt:|Steps:)", parameters)[0].strip() or None


def _newest_samples(entries: dict[str, str], limit: int = 4) -> list[tuple[str, str]]:
    """(path in repo, prompt) of the newest sample of each prompt index, for the card's widget."""
    from .models.sampling import parse_sample_name

    newest: dict[str, tuple[str, str]] = {}
    for target, local in sorted(entries.items(), key=lambda item: os.path.getmtime(item[1])):
        parsed = parse_sample_name(target.split("/")[-1])
        if target.split("/")[-2:-1] == ["sample"] and parsed:
            newest[parsed[2]] = (target, local)
    return [(target, _sample_prompt(local) or "") for target, local in list(newest.values())[-limit:]]


def _hub_id(name: str | None) -> str | None:
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def build_model_card(entries: dict[str, str], repo_id: str, base_model: str | None = None):
    """README.md for the upload {path in repo: local file}: card data (base_model, license, tags, trigger words,
    widget with the samples) and how to load it in AUTOMATIC1111, ComfyUI, diffusers and para-trainer."""
    from huggingface_hub import ModelCard, ModelCardData

    by_local = {local: target for target, local in entries.items()}
    adapter = _main_adapter([local for local in entries.values() if _is_native_para(local)])
    meta, native = _metadata(adapter), by_local[adapter]
    lora = next((by_local[local] for local in entries.values()
                 if local == os.path.splitext(adapter)[0] + "_lora.safetensors"), None)
    version = meta.get("ss_base_model_version", "")
    base = base_model or _hub_id(meta.get("ss_sd_model_name"))
    triggers = _trigger_words(meta)
    samples = _newest_samples(entries)
    user_tags = [t.strip() for t in meta.get("modelspec.tags", "").split(",") if t.strip()]
    tags = ["para", "lora", "flux" if version == "flux1" else "stable-diffusion", "text-to-image", "para-trainer"] + \
        (["stable-diffusion-xl"] if version.startswith("sdxl") else []) + (["diffusers"] if lora else []) + user_tags
    data = ModelCardData(
        base_model=base, license=meta.get("modelspec.license") or LICENSES.get(version), tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-to-image", library_name="diffusers" if lora else None,
        instance_prompt=", ".join(triggers) or None,
        widget=[{"text": prompt, "output": {"url": target}} for target, prompt in samples] or None)
    title = meta.get("modelspec.title") or os.path.splitext(os.path.basename(native))[0]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _card_body(
        title, repo_id, meta, native, lora, base, triggers, samples, BASE_NAMES.get(version, "Stable Diffusion")))
    return card


def _card_body(title, repo_id, meta, native, lora, base, triggers, samples, base_name) -> str:
    prompt = (triggers[0] if triggers else "your prompt") + ", best quality"
    subfolder, lora_name = (os.path.dirname(lora), os.path.basename(lora)) if lora else ("", "")
    lines = [f"# {title}", "",
             f"A PaRa adapter (Parameter Rank Reduction, Chen et al., ICLR 2025) for {base_name}"
             + (f" (`{base}`)" if base else "") + ", trained with para-trainer.", ""]
    if meta.get("modelspec.description"):
        lines += [meta["modelspec.description"], ""]
    lines += ["## Trigger words", "", "Use " + (", ".join(f"`{t}`" for t in triggers) if triggers else
                                               "the words of the training captions") + " in the prompt.", ""]
    flux = meta.get("ss_base_model_version") == "flux1"  # AUTOMATIC1111 has no FLUX; Forge has
    lines += ["## Files", "", "| file | what it is |", "|---|---|",
              f"| `{native}` | native PaRa file: para-trainer" + ("" if flux else
                                                                 " and the PaRa extension for AUTOMATIC1111") + " |"]
    if lora:
        lines.append(f"| `{lora}` | the same adapter as an exact LoRA/LoCon: "
                     f"{'' if flux else 'AUTOMATIC1111, '}Forge, ComfyUI, diffusers |")
    if samples:
        lines.append("| `sample/` | images made during training (prompt in each PNG's parameters) |")
    lines.append("")
    if lora:
        stem = os.path.splitext(lora_name)[0]
        load = f'pipe.load_lora_weights("{repo_id}", weight_name="{lora_name}"' + \
            (f', subfolder="{subfolder}")' if subfolder else ")")
        lines += ["## Use it", "", "### Forge" if flux else "### AUTOMATIC1111 / Forge", "",
                  f"Download `{lora}` into `models/Lora/` and add `<lora:{stem}:1>` to the prompt.", "",
                  "### ComfyUI", "",
                  f"Put `{lora_name}` in `ComfyUI/models/loras/` and load it with a **Load LoRA** node between the "
                  "checkpoint loader and the sampler.", "", "### diffusers", "", "```python", "import torch",
                  "from diffusers import AutoPipelineForText2Image", "",
                  *([] if base else [f"# BASE_MODEL: the model it was trained on ({meta.get('ss_sd_model_name')})"]),
                  f'pipe = AutoPipelineForText2Image.from_pretrained("{base or "BASE_MODEL"}", '
                  f'torch_dtype=torch.{"bfloat16" if flux else "float16"}).to("cuda")', load, f'image = pipe("{prompt}").images[0]', "```", ""]
    else:
        lines += ["## Use it", "", f"Export it for {'Forge' if flux else 'AUTOMATIC1111'}, ComfyUI and diffusers with "
                  f"`para-trainer export hf://{repo_id}/{native} --model BASE -o {title}_lora.safetensors`.", ""]
    lines += ["### para-trainer", "", "```bash", f"para-trainer pull {repo_id}",
              f"train_para.py ... --network_weights hf://{repo_id}/{native}", "```", ""]
    rows = [(label, meta[key]) for key, label in SETTINGS if meta.get(key) not in (None, "", "None", "null")]
    if rows:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {label} | `{value.replace('|', '/')}` |" for label, value in rows] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The trainer: sd-scripts' --huggingface_* options


def prepare_training(args) -> "TrainerUploads":
    """Before training: check the token and create the repository (--huggingface_repo_id), and turn Hub
    references (--network_weights, --base_weights, --resume with --resume_from_huggingface) into local paths."""
    token = args.huggingface_token or None
    uploads = TrainerUploads(args, token)
    if uploads.enabled and "/" not in args.huggingface_repo_id:  # a bare name: the token's user's namespace
        args.huggingface_repo_id = f"{check_token(token)['name']}/{args.huggingface_repo_id}"
    if uploads.enabled and os.environ.get("RANK", "0") == "0":
        prepare_repo(args.huggingface_repo_id, uploads.repo_type, uploads.private, token)
    if args.resume and (args.resume_from_huggingface or is_hub_ref(args.resume)):
        args.resume = download_state(args.resume, token)
    if args.network_weights:
        args.network_weights = resolve_path(args.network_weights, token)
    if args.base_weights:
        args.base_weights = [resolve_path(path, token) for path in args.base_weights]
    return uploads


class TrainerUploads:
    """sd-scripts' uploads: each save is pushed (in the background with --async_upload), the final one with the
    samples and model card once training is done. No failure is lost: finish() raises them all."""

    def __init__(self, args, token: str | None):
        self.args, self.token = args, token
        self.enabled = bool(args.huggingface_repo_id)
        self.repo_type = args.huggingface_repo_type or "model"
        self.private = args.huggingface_repo_visibility != "public"  # sd-scripts: private unless "public"
        self.failures: list[str] = []
        self._final: list | None = None
        self._pending: list = []
        self._executor = ThreadPoolExecutor(max_workers=1) if self.enabled and args.async_upload else None

    def saved(self, adapter_path: str, state_dir: str | None, final: bool) -> None:
        """After a save: the adapter (with its export and samples) and, with --save_state_to_huggingface, the state."""
        if not self.enabled or not os.path.isfile(adapter_path):
            return
        items = [adapter_path]
        if state_dir and self.args.save_state_to_huggingface and os.path.isdir(state_dir):
            prefix = (self.args.huggingface_path_in_repo or "").strip("/")
            items.append((state_dir, f"{prefix}/{os.path.basename(state_dir)}".strip("/")))
        if final:
            self._final = items  # pushed by finish(), after the last samples
        elif self._executor is not None:
            name, staging = os.path.basename(adapter_path), self._stage(items)
            self._pending.append(self._executor.submit(self._push, [staging], name, staging))
        else:
            self._push(items, os.path.basename(adapter_path))

    def _stage(self, items) -> str:
        """The files as they are now, hard-linked (else copied) under their paths in the repository: a background
        upload is not disturbed by --save_last_n_* removing them or the next state overwriting them."""
        staging = tempfile.mkdtemp(prefix=".tmp-hub-upload-", dir=self.args.output_dir)
        for target, local in _collect(items, self.args.huggingface_path_in_repo).items():
            copy = os.path.join(staging, *target.split("/"))
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            try:
                os.link(local, copy)
            except OSError:
                shutil.copyfile(local, copy)
        return staging

    def _push(self, items, name: str, staging: str | None = None) -> None:
        try:
            prefix = None if staging else self.args.huggingface_path_in_repo  # staged files sit at their paths
            result = push(items, self.args.huggingface_repo_id, private=self.private, token=self.token,
                          repo_type=self.repo_type, path_in_repo=prefix,
                          base_model=_hub_id(self.args.pretrained_model_name_or_path),
                          message=f"para-trainer: {name}")
            logger.info("pushed %s to %s (%s)", name, result.repo_id, result.commit_url)
        except Exception as error:  # recorded and raised by finish(): the run goes on, nothing is lost
            message = str(error) if isinstance(error, HubError) else f"{type(error).__name__}: {error}"
            self.failures.append(f"{name}: {message}")
            logger.error("upload of %s to the Hub failed: %s", name, message)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)

    def finish(self) -> None:
        """Wait for the background uploads, push the final files, and raise HubError if any upload failed."""
        for future in self._pending:
            future.result()
        if self._executor is not None:
            self._executor.shutdown()
        if self._final:
            self._push(self._final, os.path.basename(self._final[0]))
            self._final = None
        if self.failures:
            repo = self.args.huggingface_repo_id
            raise HubError(f"training finished and every file is saved in {self.args.output_dir}, but "
                           f"{len(self.failures)} upload(s) to {repo} failed:\n"
                           + "\n".join(f"  - {failure}" for failure in self.failures)
                           + f"\nupload them again with: para-trainer push {self.args.output_dir} {repo}")


# --------------------------------------------------------------------------------------------------
# Command line: `para-trainer push` and `para-trainer pull`


def add_subcommands(commands) -> None:
    push_parser = commands.add_parser("push", help="upload adapters (with export, samples, model card) in one commit")
    push_parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="then the repository: ... USER/REPO")
    push_parser.add_argument("repo_id", metavar="USER/REPO")
    push_parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push_parser.add_argument("--private", action="store_true", help="create the repository private")
    push_parser.add_argument("--message", help="commit message")
    push_parser.add_argument("--repo-type", dest="repo_type", choices=["model", "dataset"], default="model")
    push_parser.add_argument("--path-in-repo", dest="path_in_repo", help="folder in the repository (default: top)")
    push_parser.add_argument("--base-model", dest="base_model", help="Hub id of the base model, for the model card")
    push_parser.add_argument("--no-model-card", dest="model_card", action="store_false",
                             help="do not write README.md")
    push_parser.add_argument("--token", help="default: HF_TOKEN, else the `hf auth login` token")
    push_parser.set_defaults(run=run_push)

    pull_parser = commands.add_parser("pull", help="download files of a Hub repository (through the HF cache)")
    pull_parser.add_argument("repo_ref", metavar="USER/REPO[@REV]", help="or datasets/USER/REPO, or an hf:// ref")
    pull_parser.add_argument("files", nargs="*", metavar="FILE", help="paths in the repository (default: all)")
    pull_parser.add_argument("-o", "--out", default=".", help="folder to write to (default: here)")
    pull_parser.add_argument("--token", help="for private repositories; default: HF_TOKEN or the login")
    pull_parser.set_defaults(run=run_pull)


def run_push(options) -> int:
    try:
        result = push(options.paths, options.repo_id, revision=options.revision, private=options.private,
                      message=options.message, token=options.token, repo_type=options.repo_type,
                      path_in_repo=options.path_in_repo, model_card=options.model_card,
                      base_model=options.base_model)
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision} in one commit: {result.commit_url}")
    for path in result.files:
        print(f"  {path}")
    return 0


def run_pull(options) -> int:
    try:
        written = pull(options.repo_ref, options.files, options.out, token=options.token)
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pulled {len(written)} files into {options.out}")
    for path in written:
        print(f"  {path}")
    return 0
