"""Publish a Default MoE checkpoint folder to the Hugging Face Hub (`default-moe push DIR REPO_ID`).

`push_folder` checks the folder first (config.json with `auto_map`, both code files, complete safetensors weights),
then that a token is available (argument, `HF_TOKEN`, or a saved `hf auth login`), and only then talks to the Hub:
create the repo (and the branch, for `revision`), then one commit with the checkpoint's files. A README.md model card
is generated (in memory; the folder is not modified) when the folder has none.

`model.push_to_hub(repo_id)` on a `DefaultMoeForCausalLM` also uploads both code files and `auto_map` (the classes are
registered with `register_for_auto_class`); it writes transformers' generic card, though, and no tokenizer:
`push_model` saves model, tokenizer and our card and pushes them together.
"""

import json
import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token

from .cards import build_model_card

CODE_FILES = ("configuration_default_moe.py", "modeling_default_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_default_moe.DefaultMoeConfig",
    "AutoModelForCausalLM": "modeling_default_moe.DefaultMoeForCausalLM",
}
# Never uploaded: hidden files, Python caches, Trainer checkpoints and logs that may sit in an output folder.
IGNORED = (".*", "__pycache__", "*.pyc", "checkpoint-*", "runs", "optimizer.pt", "scheduler.pt", "rng_state*.pth")
DEFAULT_COMMIT_MESSAGE = "Upload Default MoE checkpoint"


class HubError(ValueError):
    """A push that cannot start or did not succeed; the message is one line."""


def check_checkpoint_folder(folder: str | os.PathLike) -> list[str]:
    """Raise `HubError` unless `folder` is a complete Default MoE checkpoint; return the files to upload (relative)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HubError(f"{folder} is not a checkpoint folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise HubError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("model_type") != "default_moe":
        raise HubError(f"{config_path} is not a Default MoE config (model_type={config.get('model_type')!r})")
    auto_map = config.get("auto_map") or {}
    for auto_class, target in AUTO_MAP.items():
        if auto_map.get(auto_class) != target:
            raise HubError(
                f"{config_path} has no auto_map entry {auto_class} -> {target}: save it with `import default_moe` "
                "done first so trust_remote_code loading works"
            )
    for name in CODE_FILES:
        if not (folder / name).is_file():
            raise HubError(f"{folder} is missing {name}, which trust_remote_code loading needs")
    _check_weights(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED):
            files.append(relative.as_posix())
    return files


def _check_weights(folder: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            raise HubError(f"{index_path} is not a valid safetensors index: {error}") from error
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise HubError(f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {index_path.name}")
    elif not (folder / "model.safetensors").is_file():
        raise HubError(f"{folder} has no weights (model.safetensors or model.safetensors.index.json)")


def resolve_token(token: str | None = None) -> str:
    """The token to push with: `token`, else `HF_TOKEN`, else the saved login; `HubError` if there is none."""
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    return token


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload the checkpoint in `folder` to the model repo `repo_id` and return the commit.

    Creates the repo if needed (`private` applies only then) and the branch `revision` if given (from `main`).
    Uploads every file of the folder except hidden files, caches and Trainer checkpoints (see `IGNORED`): weights,
    config.json, the two code files, tokenizer files, README.md (generated if missing) and anything else that is
    there, e.g. training_summary.json. `endpoint` defaults to `HF_ENDPOINT` / https://huggingface.co.
    """
    folder = Path(folder)
    files = check_checkpoint_folder(folder)
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise HubError(f"invalid repo id {repo_id!r}: expected 'name' or 'namespace/name'")
    token = resolve_token(token)
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: unset it to push to the Hub")

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if "README.md" not in files:
        card = build_model_card(folder, repo_id=repo_id)
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))

    api = HfApi(endpoint=endpoint, token=token, library_name="default-moe")
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)


def push_model(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Save `model` (and `tokenizer`) with `save_pretrained`, write our model card, and `push_folder` the result.

    `card_kwargs` go to `default_moe.cards.write_model_card` (base_model, base_model_relation, datasets, extra, ...).
    """
    from .cards import write_model_card

    resolve_token(token)  # fail before saving anything
    with tempfile.TemporaryDirectory(prefix="default-moe-push-") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, repo_id=repo_id, **card_kwargs)
        return push_folder(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            token=token,
            commit_message=commit_message,
            endpoint=endpoint,
        )


# -- CLI ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("folder", help="checkpoint folder (config.json with auto_map, code files, weights)")
    parser.add_argument("repo_id", help="Hub model repo, e.g. your-name/default-moe-tiny")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", help="branch to push to (created from main if missing); default: main")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="commit message")


def run(args) -> int:
    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.folder} to {info.commit_url}")
    return 0
