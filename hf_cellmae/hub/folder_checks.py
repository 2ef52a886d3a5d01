"""Checks a model folder must pass before it is pushed to the Hub.

A pushed folder must load with the installed hf_cellmae (no missing or unexpected weights), keep
its weights in safetensors, hold no pickle files (they run code when loaded), carry the model code
that ``trust_remote_code=True`` imports, and hold no secrets (access tokens, private keys, or the
current Hub token anywhere in a file). Its ``*.py`` files must be the installed hf_cellmae's own,
byte for byte (whoever loads the repo with ``trust_remote_code=True`` runs them), unless edited code
is allowed, and then they are named in a warning. ``check_model_folder`` raises ``FolderCheckError``
listing every problem with its fix, or returns the list of files that would be uploaded.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Files never uploaded (caches, VCS, editor and OS litter); the user can add more with `exclude`.
ALWAYS_EXCLUDED = [".git/*", ".git", "*/.git/*", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".DS_Store", ".cache/*"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"}
SECRET_FILE_NAMES = {".env", ".netrc", "token", "stored_tokens", ".git-credentials", "id_rsa", "id_ed25519"}
SECRET_PATTERNS = {
    "a Hugging Face access token": re.compile(rb"hf_[A-Za-z0-9]{30,}"),
    "an AWS access key": re.compile(rb"AKIA[0-9A-Z]{16}"),
    "a private key": re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a GitHub token": re.compile(rb"gh[pousr]_[A-Za-z0-9]{30,}"),
}
SECRET_KEYS = re.compile(r"(token|password|passwd|secret|api_key|apikey|credential)", re.IGNORECASE)
TEXT_SUFFIXES = {".json", ".md", ".py", ".txt", ".yaml", ".yml", ".cfg", ".toml", ".ini", ".csv", ".sh", ".env", ""}
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.MULTILINE)


class FolderCheckError(ValueError):
    """The folder must not be pushed; ``problems`` lists each reason with its fix."""

    def __init__(self, model_dir: Path, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"refusing to push {model_dir}: {len(problems)} problem(s)\n{listing}")


@dataclass
class FolderReport:
    """What a passing folder holds: the files to upload (relative POSIX paths) and what was checked."""

    model_dir: Path
    files: list[str]
    architecture: str
    weight_files: list[str]
    remote_code_files: list[str]
    warnings: list[str] = field(default_factory=list)
    modified_code: dict[str, str] = field(
        default_factory=dict
    )  # *.py files that are not the installed hf_cellmae's -> why


def list_upload_files(model_dir: Path, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every file under ``model_dir`` that an upload would send, minus excluded glob patterns."""
    patterns = [*ALWAYS_EXCLUDED, *exclude]
    files = []
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            relative = path.relative_to(model_dir).as_posix()
            if not any(fnmatch.fnmatch(relative, p) for p in patterns):
                files.append(relative)
    return files


def is_pickle(path: Path) -> bool:
    """True for a raw pickle (protocol 2+ header) or a zip holding one (torch.save format)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def find_pickles(model_dir: Path, files: list[str]) -> list[str]:
    problems = []
    for relative in files:
        path = model_dir / relative
        if path.suffix.lower() in PICKLE_SUFFIXES or is_pickle(path):
            problems.append(
                f"{relative} is (or may be) a pickle file, which runs arbitrary code when loaded; "
                "convert weights to safetensors (model.save_pretrained) and delete it, or exclude it "
                f"(--exclude '{relative}')"
            )
    return problems


def find_secrets(model_dir: Path, files: list[str], token: str | None) -> list[str]:
    """Secrets in the files: known token formats, private keys, secret-named JSON keys, the Hub token itself."""
    problems = []
    for relative in files:
        path = model_dir / relative
        if path.name.lower() in SECRET_FILE_NAMES:
            problems.append(
                f"{relative} looks like a credentials file; delete it or exclude it (--exclude '{relative}')"
            )
            continue
        if path.suffix.lower() == ".safetensors":
            from .model_card import safetensors_header

            content = json.dumps(safetensors_header(path).get("__metadata__") or {}).encode()
        elif path.suffix.lower() in TEXT_SUFFIXES or path.stat().st_size < 1_000_000:
            content = path.read_bytes()
        else:
            continue
        if token and token.encode() in content:
            problems.append(f"{relative} contains your Hub access token; remove it from the file before pushing")
            continue
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(content):
                problems.append(f"{relative} contains what looks like {what}; remove it before pushing")
                break
        else:
            if path.suffix.lower() == ".json":
                problems.extend(secret_json_keys(relative, content))
    return problems


def secret_json_keys(relative: str, content: bytes) -> list[str]:
    """Non-empty string values under keys named like secrets (``hub_token``, ``wandb_api_key``...)."""
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    found = []

    def walk(node, trail: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRET_KEYS.search(str(key)) and isinstance(value, str) and value.strip():
                    found.append(f"{relative} sets {trail}{key} to a non-empty value; blank it before pushing")
                walk(value, f"{trail}{key}.")
        elif isinstance(node, list):
            for item in node:
                walk(item, trail)

    walk(data, "")
    return found


def check_remote_code(model_dir: Path, config: dict) -> tuple[list[str], list[str]]:
    """The ``auto_map`` modules and every ``from .x import`` they reach must be in the folder."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        return [], [
            "config.json has no auto_map, so the model cannot load with trust_remote_code=True; "
            "save it with the hf_cellmae model classes (they register for the auto classes) and push again"
        ]
    wanted = {
        ref.split("--")[-1].split(".")[0]
        for refs in auto_map.values()
        for ref in (refs if isinstance(refs, list) else [refs])
        if ref
    }
    seen, problems, queue = [], [], sorted(wanted)
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.append(module)
        source = model_dir / f"{module}.py"
        if not source.is_file():
            problems.append(
                f"{module}.py (needed by trust_remote_code loading) is missing; save the model with "
                "model.save_pretrained(folder), which copies the model code"
            )
            continue
        queue.extend(RELATIVE_IMPORT.findall(source.read_text(encoding="utf-8")))
    return sorted(f"{m}.py" for m in seen), problems


def find_modified_code(model_dir: Path, files: list[str]) -> dict[str, str]:
    """``*.py`` files to upload that are not byte-identical to the installed hf_cellmae's file of that name.

    Returns ``{file: what is wrong with it}``; the files are what ``trust_remote_code=True`` would run.
    """
    import hf_cellmae

    package = Path(hf_cellmae.__file__).parent
    found = {}
    for relative in files:
        if not relative.endswith(".py"):
            continue
        own = package / relative
        if not own.is_file():
            found[relative] = f"{relative} is not part of hf_cellmae {hf_cellmae.__version__}"
        elif own.read_bytes() != (model_dir / relative).read_bytes():
            found[relative] = f"{relative} differs from the installed hf_cellmae {hf_cellmae.__version__}'s {own.name}"
    return found


def check_loads(model_dir: Path, config: dict) -> tuple[str, list[str]]:
    """Load the folder with the installed hf_cellmae classes; every saved tensor must be used and none missing."""
    import transformers

    import hf_cellmae

    architecture = (config.get("architectures") or ["CellMAEModel"])[0]
    model_class = getattr(hf_cellmae, architecture, None) or getattr(transformers, architecture, None)
    if model_class is None:
        return architecture, [
            f"config.json names architecture {architecture!r}, which neither hf_cellmae nor transformers defines"
        ]
    try:
        _, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    except Exception as err:  # any failure to load is a refusal, reported with its cause
        return architecture, [f"the folder does not load as {architecture}: {type(err).__name__}: {err}"]
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(
                f"loading as {architecture} reports {len(keys)} {kind.replace('_', ' ')} ({shown}); the weights do not match config.json"
            )
    if (model_dir / "preprocessor_config.json").is_file():
        try:
            transformers.AutoImageProcessor.from_pretrained(model_dir)
        except Exception as err:
            problems.append(f"preprocessor_config.json does not load: {type(err).__name__}: {err}")
    return architecture, problems


def check_model_folder(
    model_dir: str | Path,
    exclude: list[str] | tuple[str, ...] = (),
    token: str | None = None,
    allow_modified_code: bool = False,
) -> FolderReport:
    """Check a model folder before pushing it; raise ``FolderCheckError`` listing every problem.

    Args:
        model_dir: the folder to push.
        exclude: glob patterns (relative to the folder) of files not to upload and not to check.
        token: the Hub token that will be used; a file containing it is refused.
        allow_modified_code: accept ``*.py`` files that are not the installed hf_cellmae's own (edited model
            code); they are then listed in ``warnings`` and ``modified_code`` instead of refused.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FolderCheckError(model_dir, [f"{model_dir} is not a folder"])
    files = list_upload_files(model_dir, exclude)
    problems = find_pickles(model_dir, files) + find_secrets(model_dir, files, token)
    modified_code = find_modified_code(model_dir, files)
    if not allow_modified_code:
        problems += [
            f"{what}: whoever loads the repo with trust_remote_code=True runs it; re-save the model with the installed "
            "hf_cellmae (from_pretrained, then save_pretrained copies its code), exclude the file, or pass "
            "--allow-modified-code (allow_modified_code=True) to upload it as it is"
            for what in modified_code.values()
        ]

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FolderCheckError(
            model_dir, problems + ["config.json is missing; save the model with model.save_pretrained(folder)"]
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FolderCheckError(model_dir, problems + [f"config.json is not valid JSON: {err}"]) from err

    from .model_card import weight_files

    weights = weight_files(model_dir)
    if not weights:
        problems.append(
            "no model.safetensors (or model.safetensors.index.json) in the folder; save with model.save_pretrained(folder)"
        )
    problems += [f"weight shard {w.name} named by the index is missing" for w in weights if not w.is_file()]
    if "preprocessor_config.json" not in files:
        problems.append(
            "preprocessor_config.json is missing, so users cannot load the processor; "
            "save one with CellMAEImageProcessor(image_size=...).save_pretrained(folder)"
        )
    remote_code, remote_problems = check_remote_code(model_dir, config)
    problems += remote_problems
    architecture = (config.get("architectures") or ["unknown"])[0]
    if weights and all(w.is_file() for w in weights):
        architecture, load_problems = check_loads(model_dir, config)
        problems += load_problems
    if problems:
        raise FolderCheckError(model_dir, problems)
    warnings = [] if "README.md" in files else ["README.md is missing; it will be generated (cellmae card)"]
    warnings += [f"{what}; uploading it as it is (allowed)" for what in modified_code.values()]
    return FolderReport(
        model_dir, files, architecture, [w.name for w in weights], remote_code, warnings, modified_code
    )
