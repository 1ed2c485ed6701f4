"""Safe by default (issue 10): no code from a student folder runs unasked, no user file is
deleted, relative paths work, and bad input gives a message that names the fix."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.student import CheckpointError, RemoteCodeError, UnsafeDirectoryError
from llama_index_d2llm.student.config import D2LLMConfig
from llama_index_d2llm.student.model import compute_fingerprint
from llama_index_d2llm.trainer import cli
from tests.distill_fixtures import TOPICS, OverlapTeacher, write_beir
from tests.test_cli import TINY


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"))


@pytest.fixture
def fake_teacher(monkeypatch):
    from llama_index_d2llm.trainer import teacher as teacher_module

    monkeypatch.setattr(teacher_module.Teacher, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: OverlapTeacher()))


@pytest.fixture
def hf_modules(tmp_path, monkeypatch):
    """Remote code is copied into transformers' module cache: keep it in the test's folder."""
    import sys

    from transformers import dynamic_module_utils

    cache = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(cache))
    yield cache
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


def _remote_code_backbone(tiny_backbone: str, folder: Path, marker: Path,
                          model_type: str = "llama") -> Path:
    """The tiny backbone plus an ``auto_map`` module that writes ``marker`` when imported."""
    shutil.copytree(tiny_backbone, folder)
    (folder / "marker_model.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig, LlamaModel\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "class MarkerConfig(LlamaConfig):\n"
        f"    model_type = {model_type!r}\n"
        "class MarkerModel(LlamaModel):\n"
        "    config_class = MarkerConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "marker_model.MarkerConfig",
                          "AutoModel": "marker_model.MarkerModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _edit_config(directory: Path, **changes) -> None:
    """Edit d2llm_config.json as a stranger would, and recompute its fingerprint (anyone can)."""
    from safetensors.torch import load_file

    path = directory / "d2llm_config.json"
    data = {**json.loads(path.read_text()), **changes}
    config = D2LLMConfig.from_dict(data)
    adapter = directory / "adapter" / "adapter_model.safetensors"
    data["fingerprint"] = compute_fingerprint(
        config, load_file(directory / "heads.safetensors"),
        load_file(adapter) if config.lora is not None else None)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- 1. remote code
def test_a_student_folder_cannot_turn_remote_code_on(tmp_path, tiny_student_dir, tiny_backbone,
                                                     beir, hf_modules, capsys):
    from llama_index_d2llm import D2LLMEmbedding

    marker = tmp_path / "MARKER"
    remote = _remote_code_backbone(tiny_backbone, tmp_path / "remote-backbone", marker)
    student = Path(shutil.copytree(tiny_student_dir, tmp_path / "student"))
    _edit_config(student, backbone=str(remote), trust_remote_code=True)

    with pytest.raises(CheckpointError, match=r"trust_remote_code=True.*--trust-remote-code"):
        D2LLMStudent.from_pretrained(student, dtype="float32")
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        D2LLMEmbedding(model_name=str(student), dtype="float32")
    # the CPU: a refusal does not depend on the device, and a CUDA run adds nothing to check
    eval_args = ["eval", str(student), "--data", str(beir), "--split", "train", "--top-k", "5",
                 "--rerank-k", "5", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert cli.main(eval_args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "Traceback" not in err
    assert not marker.exists()

    # the caller's explicit opt-in does run it (so the refusals above are not vacuous)
    assert cli.main([*eval_args, "--trust-remote-code"]) == 0
    assert marker.read_text() == "remote code ran"
    marker.unlink()
    loaded = D2LLMStudent.from_pretrained(student, dtype="float32", trust_remote_code=True)
    assert type(loaded.body).__name__ == "MarkerModel"


def test_a_backbone_that_needs_its_own_code_names_the_flag(tmp_path, tiny_backbone, beir,
                                                          hf_modules, capsys):
    marker = tmp_path / "MARKER"
    remote = _remote_code_backbone(tiny_backbone, tmp_path / "custom", marker,
                                   model_type="marker-llama")
    from llama_index_d2llm.trainer.teacher import Teacher

    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        D2LLMStudent.from_backbone(str(remote), pma_heads=4, dtype="float32")
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        # device="cpu": refused before any device is used
        Teacher.from_pretrained(str(remote), dtype="float32", device="cpu")
    for flag in ("--student", "--teacher"):
        code = cli.main(["distill", "--corpus", str(beir), flag, str(remote), "--output",
                         str(tmp_path / "s"), *TINY])
        assert code == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{flag} {str(remote)!r} needs to run its own Python code" in err
        assert "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "s.work").exists()


def test_a_saved_distill_config_cannot_turn_remote_code_on(tmp_path):
    saved = tmp_path / "distill_config.json"
    saved.write_text(json.dumps({"corpus": "docs", "output": "s", "trust_remote_code": True}))
    args = cli.build_parser().parse_args(["distill", "--config", str(saved)])
    assert cli.config_from_args(args).trust_remote_code is False
    args = cli.build_parser().parse_args(["distill", "--config", str(saved),
                                          "--trust-remote-code"])
    assert cli.config_from_args(args).trust_remote_code is True


# ---------------------------------------------------------------------------- 2. relative paths
def test_a_relative_corpus_folder_works(tmp_path, tiny_backbone, fake_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = Path("my_docs")
    (docs / "sub").mkdir(parents=True)
    for number, (a, b) in enumerate(TOPICS):
        folder = docs / "sub" if number % 2 else docs
        (folder / f"doc{number}.txt").write_text(f"The {a} and the {b}. A {a} near a {b}.\n")
    assert cli.main(["distill", "--corpus", "./my_docs", "--output", "student", "--student",
                     tiny_backbone, "--max-steps", "1", *TINY]) == 0
    from llama_index_d2llm.trainer.corpus import load_corpus

    ids = {p.id for p in load_corpus("./my_docs")}
    assert {"doc0.txt#0", "sub/doc1.txt#0"} <= ids
    assert (tmp_path / "student" / "d2llm_config.json").is_file()


# ---------------------------------------------------------------------------- 3./4. user files
def test_work_dir_of_the_user_is_refused_and_kept(tmp_path, beir, tiny_backbone, fake_teacher,
                                                  capsys):
    work = tmp_path / "my-project"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "precious.txt").write_text("mine")
    argv = ["distill", "--corpus", str(beir), "--output", str(tmp_path / "s"), "--work-dir",
            str(work), "--student", tiny_backbone, "--max-steps", "1", *TINY]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--work-dir" in err and "not made by d2llm-rag" in err
    assert (work / "checkpoints" / "precious.txt").read_text() == "mine"
    assert not (tmp_path / "s").exists()

    # a work directory the tool made is reused, and a fresh run clears only its checkpoints
    fresh = tmp_path / "fresh-work"
    argv[argv.index(str(work))] = str(fresh)
    assert cli.main([*argv, "--checkpoint-every", "1"]) == 0
    assert (fresh / ".d2llm-work").is_file()
    # one written before the marker existed holds only the stages' folders: adopted
    (fresh / ".d2llm-work").unlink()
    assert cli.main([*argv, "--checkpoint-every", "1", "--max-steps", "2", "--resume"]) == 0
    assert (fresh / ".d2llm-work").is_file()
    (fresh / "checkpoints" / "notes.txt").write_text("kept")
    assert cli.main(argv) == 0
    assert (fresh / "checkpoints" / "notes.txt").read_text() == "kept"


def test_work_dir_inside_the_output_is_refused(tmp_path, beir, tiny_backbone, capsys):
    argv = ["distill", "--corpus", str(beir), "--output", str(tmp_path / "s"), "--work-dir",
            str(tmp_path / "s" / "work"), "--student", tiny_backbone, *TINY]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "is inside --output" in capsys.readouterr().err


def test_a_second_run_on_the_same_work_dir_is_refused_naming_the_first(
        tmp_path, beir, tiny_backbone, fake_teacher, capsys):
    """Issue 22.9: two runs into one --output (and so one work folder) both ran, the last
    writer winning. The second, started while the first trains, is refused and told which
    process holds the folder; the first finishes."""
    from llama_index_d2llm.trainer.distill import distill

    output = tmp_path / "student"
    argv = ["distill", "--corpus", str(beir), "--output", str(output), "--student",
            tiny_backbone, "--max-steps", "2", *TINY]
    second: list[int] = []

    def start_another(step: int, logs: dict) -> None:
        if not second:
            second.append(cli.main(argv))

    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert distill(config, step_callback=start_another) == output
    assert second == [cli.EXIT_USAGE]
    err = capsys.readouterr().err
    assert "is in use by another d2llm-rag run" in err and f"process {os.getpid()} " in err
    assert json.loads((output / "training_summary.json").read_text())["training"]["steps"] == 2
    assert cli.main(argv) == 0  # the lock went with the first run


def test_redistilling_keeps_the_users_files(tmp_path, beir, tiny_backbone, fake_teacher, capsys):
    output = tmp_path / "student"
    argv = ["distill", "--corpus", str(beir), "--output", str(output), "--student",
            tiny_backbone, "--max-steps", "1", *TINY]
    assert cli.main(argv) == 0
    (output / "notes.md").write_text("how I use this student")
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "notes.md" in err and "would delete them" in err
    assert (output / "notes.md").read_text() == "how I use this student"
    (output / "notes.md").unlink()
    assert cli.main(argv) == 0  # a student folder with only its own files is replaced


def test_save_pretrained_never_replaces_a_users_folder(tmp_path, tiny_student_dir):
    student = D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32", trainable=True)
    folder = tmp_path / "Documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeDirectoryError, match="not a D2LLM student"):
        student.save_pretrained(folder)
    assert (folder / "thesis.tex").read_text() == "years of work"
    saved = student.save_pretrained(tmp_path / "s")
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeDirectoryError, match=r"notes\.txt"):
        student.save_pretrained(saved)
    assert (saved / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- 6. messages
@pytest.mark.parametrize("flag", ["--student", "--teacher"])
def test_a_missing_model_path_names_the_flag(flag, tmp_path, beir, tiny_backbone, capsys):
    argv = ["distill", "--corpus", str(beir), "--output", str(tmp_path / "s"),
            "--student", tiny_backbone, "--teacher", tiny_backbone, *TINY]
    argv[argv.index(flag) + 1] = "./no/such/model"
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{flag} './no/such/model': the path does not exist" in err
    assert "Repo id" not in err
    assert not (tmp_path / "s.work").exists()


def test_binary_files_can_be_excluded_on_the_command_line(tmp_path, tiny_backbone, capsys):
    from llama_index_d2llm.trainer.distill import load_inputs

    docs = tmp_path / "docs"
    docs.mkdir()
    for number, (a, b) in enumerate(TOPICS):
        (docs / f"doc{number}.txt").write_text(f"The {a} and the {b}.\n")
    (docs / "blob.bin").write_bytes(b"\x00\x01binary")
    argv = ["distill", "--corpus", str(docs), "--output", str(tmp_path / "s"), "--student",
            tiny_backbone, *TINY]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "--exclude '*.bin'" in capsys.readouterr().err
    config = cli.config_from_args(cli.build_parser().parse_args([*argv, "--exclude", "*.bin"]))
    passages, _, _ = load_inputs(config)
    assert len(passages) == len(TOPICS) and config.exclude == ["*.bin"]


@pytest.mark.parametrize("edit", ["missing", "not json", "alpha", "targets"])
def test_an_edited_adapter_config_is_a_checkpoint_error(edit, tmp_path, tiny_student_dir):
    student = Path(shutil.copytree(tiny_student_dir, tmp_path / "student"))
    path = student / "adapter" / "adapter_config.json"
    settings = json.loads(path.read_text())
    if edit == "missing":
        path.unlink()
        match = r"adapter_config\.json' is missing"
    elif edit == "not json":
        path.write_text("{not json")
        match = "not readable JSON"
    elif edit == "alpha":
        path.write_text(json.dumps({**settings, "lora_alpha": 64}))
        match = "lora_alpha.*would change the vectors"
    else:
        path.write_text(json.dumps({**settings, "target_modules": ["no_such_layer"]}))
        match = r"adapter_config\.json was edited"
    with pytest.raises(CheckpointError, match=match):
        D2LLMStudent.from_pretrained(student, dtype="float32")


def test_a_lone_surrogate_is_a_clear_error(tiny_student_dir):
    from llama_index_d2llm import D2LLMEmbedding

    embedding = D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")
    with pytest.raises(ValueError, match="lone surrogate"):
        embedding.get_query_embedding("abc\ud800")
    with pytest.raises(ValueError, match="text 1 is not valid Unicode"):
        embedding.student.encode(["fine", "bad \udfff text"])


# ---------------------------------------------------------------------------- 7. smaller
def test_a_failed_validation_leaves_no_work_folder(tmp_path, tiny_backbone):
    (tmp_path / "empty").mkdir()
    argv = ["distill", "--corpus", str(tmp_path / "empty"), "--output", str(tmp_path / "s"),
            "--student", tiny_backbone, *TINY]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_students_and_outputs_get_the_umask_permissions(tmp_path, tiny_student_dir, beir,
                                                        tiny_backbone, fake_teacher):
    old = os.umask(0o022)
    try:
        student = D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32",
                                               trainable=True)
        saved = student.save_pretrained(tmp_path / "s")
        output = tmp_path / "distilled"
        assert cli.main(["distill", "--corpus", str(beir), "--output", str(output),
                         "--student", tiny_backbone, "--max-steps", "1", *TINY]) == 0
        metrics = tmp_path / "metrics.json"
        assert cli.main(["eval", "--bm25", "--data", str(beir), "--split", "train",
                         "--output", str(metrics)]) == 0
    finally:
        os.umask(old)
    for directory in (saved, saved / "adapter", output):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    for file in (saved / "d2llm_config.json", output / "heads.safetensors", metrics):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_settings_that_shape_the_vectors_are_covered_by_the_fingerprint(tmp_path,
                                                                        tiny_student_dir):
    for name, value in [("max_query_length", 4), ("max_passage_length", 8), ("pma_heads", 2)]:
        edited = Path(shutil.copytree(tiny_student_dir, tmp_path / name))
        path = edited / "d2llm_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))
        with pytest.raises(CheckpointError, match="do not match the fingerprint"):
            D2LLMStudent.from_pretrained(edited, dtype="float32")


def test_fingerprints_of_students_saved_before_stay_valid(tmp_path, tiny_student_dir):
    """A config without the newer fingerprint's marker is checked the old way."""
    old = Path(shutil.copytree(tiny_student_dir, tmp_path / "old"))
    path = old / "d2llm_config.json"
    data = json.loads(path.read_text())
    assert data["extra"] == {"fingerprint_version": 2}
    data["extra"] = {}
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        D2LLMStudent.from_pretrained(old, dtype="float32")  # dropping the marker is an edit
    _edit_config(old)  # what the old code wrote: no marker, fingerprint without the settings
    loaded = D2LLMStudent.from_pretrained(old, dtype="float32")
    fresh = D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32")
    texts = ["the cat sat on the mat", "a dog runs in the park"]
    torch.testing.assert_close(loaded.encode(texts), fresh.encode(texts))
    assert loaded.fingerprint != fresh.fingerprint
