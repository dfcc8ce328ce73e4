"""The bad-input corpus: configs, ScienceQA folders, images, LLaVA JSON, pools and teacher
outputs that are malformed, empty, huge, of the wrong type or encoding, or duplicated.

Each command case must end with exit code 2 and one line on stderr naming the problem and
where it is, with no traceback, and leave what was already in the output folder as it
was. Teacher outputs are counted drops, never exceptions. (Server requests: the 4xx cases
of tests/test_serve.py.)"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mmdc.cli import main
from tests.conftest import MINI


def _mini(tmp_path: Path) -> Path:
    root = tmp_path / "sqa"
    shutil.copytree(MINI, root)
    return root


def _problems(root: Path) -> dict:
    return json.loads((root / "problems.json").read_text(encoding="utf-8"))


def _image_pid(root: Path) -> str:
    splits = json.loads((root / "pid_splits.json").read_text())
    probs = _problems(root)
    return next(p for p in splits["test"] if probs[p].get("image"))


def _edit(root: Path, fn) -> None:
    probs = _problems(root)
    fn(probs)
    (root / "problems.json").write_text(json.dumps(probs), encoding="utf-8")


# ------------------------------------------------------------------ the cases
# each: (name, setup(tmp_path) -> extra argv, words the error line must contain)


def cfg_file(tmp_path, text: bytes | str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def eval_args(root, *extra):
    return ["data.format=scienceqa", f"data.root={root}", "data.pool=null", *extra]


def llava_case(tmp_path, entries) -> list[str]:
    root = _mini(tmp_path)
    path = tmp_path / "llava.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries),
                    encoding="utf-8")
    return ["data.format=llava", f"data.root={path}", f"data.image_root={root}",
            "data.test_split=all", "data.pool=null"]


def _llava_ok(i=0, **over):
    e = {"id": f"q{i}", "image": None, "conversations": [
        {"from": "human", "value": "Which is a mammal?\nA. cat\nB. fish"},
        {"from": "gpt", "value": "A"}]}
    e.update(over)
    return e


def _pool_case(tmp_path, text: str) -> list[str]:
    root = _mini(tmp_path)
    (root / "pool.jsonl").write_text(text, encoding="utf-8")
    return ["run", *eval_args(root)[:-1], "data.pool=pool", "data.probe_split=test"]


CASES = {
    # configs
    "config: malformed YAML": (lambda t: [cfg_file(t, "eval: [1, 2\n")], ["malformed YAML",
                                                                          "line"]),
    "config: unknown key": (lambda t: [cfg_file(t, "evals: {}\n")], ["unknown key 'evals'"]),
    "config: wrong type": (lambda t: ["eval.batch_size=many"], ["eval.batch_size"]),
    "config: value out of range": (lambda t: ["verify.tau=2"], ["verify.tau"]),
    "config: not UTF-8": (lambda t: [cfg_file(t, "run_dir: caf\xe9\n".encode("latin-1"))],
                          ["not UTF-8"]),
    "config: top level is a list": (lambda t: [cfg_file(t, "- a\n- b\n")], ["mapping"]),
    "config: override without =": (lambda t: ["eval.batch_size"], ["overrides are key=value"]),
    "config: empty YAML mapping value": (lambda t: [cfg_file(t, "teacher:\n  path:\n")],
                                         ["teacher.path"]),
    # ScienceQA folders and images
    "scienceqa: no problems.json": (
        lambda t: eval_args((lambda r: ((r / "problems.json").unlink(), r)[1])(_mini(t))),
        ["problems.json", "not found"]),
    "scienceqa: problems.json not JSON": (
        lambda t: eval_args((lambda r: ((r / "problems.json").write_text("{oops"), r)[1])(
            _mini(t))), ["problems.json", "malformed JSON"]),
    "scienceqa: problems.json not UTF-8": (
        lambda t: eval_args((lambda r: ((r / "problems.json").write_bytes(
            (r / "problems.json").read_text(encoding="utf-8").encode("utf-16")), r)[1])(
            _mini(t))), ["problems.json", "UTF-8"]),
    "scienceqa: image file missing": (
        lambda t: eval_args((lambda r: (shutil.rmtree(r / "images" / "test" / _image_pid(r)),
                                        r)[1])(_mini(t))), ["image file not found"]),
    "scienceqa: unreadable image": (
        lambda t: eval_args((lambda r: ((r / "images" / "test" / _image_pid(r) / _problems(r)[
            _image_pid(r)]["image"]).write_bytes(b"\x89PNG not really"), r)[1])(_mini(t))),
        ["unreadable image"]),
    "scienceqa: answer index out of range": (
        lambda t: eval_args((lambda r: (_edit(r, lambda p: p[_image_pid(r)].update(answer=9)),
                                        r)[1])(_mini(t))), ["answer"]),
    "scienceqa: answer of the wrong type": (
        lambda t: eval_args((lambda r: (_edit(r, lambda p: p[_image_pid(r)].update(
            answer="B")), r)[1])(_mini(t))), ["answer"]),
    "scienceqa: choices missing": (
        lambda t: eval_args((lambda r: (_edit(r, lambda p: p[_image_pid(r)].pop("choices")),
                                        r)[1])(_mini(t))), ["choices"]),
    "scienceqa: empty split": (
        lambda t: eval_args(_mini(t), "data.test_split=val"), ["val"]),
    "scienceqa: image path escapes the root": (
        lambda t: eval_args((lambda r: (_edit(r, lambda p: p[_image_pid(r)].update(
            image="../../../../etc/passwd")), r)[1])(_mini(t))), ["image"]),
    "scienceqa: split lists an unknown problem": (
        lambda t: eval_args((lambda r: ((r / "pid_splits.json").write_text(json.dumps(
            {"train": [], "val": [], "test": ["nope"]})), r)[1])(_mini(t))), ["nope"]),
    # LLaVA instruction JSON
    "llava: not a list": (lambda t: llava_case(t, {"id": "x"}), ["list"]),
    "llava: empty": (lambda t: llava_case(t, []), ["no entries"]),
    "llava: missing conversations": (
        lambda t: llava_case(t, [{"id": "q0", "image": None}]), ["q0", "conversations"]),
    "llava: turn of the wrong role": (
        lambda t: llava_case(t, [_llava_ok(conversations=[
            {"from": "gpt", "value": "A"}, {"from": "human", "value": "?"}])]), ["human"]),
    "llava: image without <image> tag": (
        lambda t: llava_case(t, [_llava_ok(image="images/test/x/image.png")]), ["<image>"]),
    "llava: duplicate ids": (lambda t: llava_case(t, [_llava_ok(0), _llava_ok(0)]),
                             ["duplicate id 'q0'"]),
    "llava: malformed JSON": (lambda t: llava_case(t, '[{"id": "q0",'), ["malformed JSON"]),
    # image pools (JSONL)
    "pool: malformed line": (
        lambda t: _pool_case(t, '{"id": "p0", "image": "a.png"}\n{oops}\n{"id": "p2"}\n'),
        ["pool.jsonl, line 2"]),
    "pool: row missing its image": (
        lambda t: _pool_case(t, '{"id": "p0"}\n'), ["line 1", "image"]),
}


# ------------------------------------------------- more cases, as a new user meets them


def _file(tmp_path, name="a_file.txt") -> Path:
    path = tmp_path / name
    path.write_text("not a folder\n")
    return path


PLAIN: list[Path] = []  # the plain LLaVA checkpoint (a session fixture), set by the test


def _checkpoint(tmp_path, plain: Path, damage) -> list[str]:
    """A copy of the plain LLaVA checkpoint, damaged, evaluated as the model."""
    folder = tmp_path / "ckpt"
    shutil.copytree(plain, folder)
    damage(folder)
    return ["--model", str(folder)]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def bomb_png(side: int = 30000) -> bytes:
    """A real decompression bomb: a valid 1-bit greyscale PNG of side x side pixels (900
    million at 30000), all black, about 110 KB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte, then the row's bits
    data = b"".join(z.compress(row * 1000) for _ in range(side // 1000))
    data += z.compress(row * (side % 1000)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _bomb_in_test_split(tmp_path) -> list[str]:
    root = _mini(tmp_path)
    pid = _image_pid(root)
    (root / "images" / "test" / pid / _problems(root)[pid]["image"]).write_bytes(bomb_png())
    return eval_args(root)


def _pool_image(tmp_path, payload: bytes) -> list[str]:
    root = _mini(tmp_path)
    (root / "pool").mkdir()
    (root / "pool" / "p0.png").write_bytes(payload)
    (root / "pool.jsonl").write_text('{"id": "p0", "image": "pool/p0.png"}\n')
    return ["run", *eval_args(root)[:-1], "data.pool=pool", "data.probe_split=test"]


MORE_CASES = {
    # paths: files where folders belong
    "run_dir is an existing file": (
        lambda t: ["run", f"run_dir={_file(t)}", *eval_args(_mini(t))],
        ["run_dir", "a_file.txt", "not a folder"]),
    "run_dir is under a file": (
        lambda t: ["run", f"run_dir={_file(t)}/sub", *eval_args(_mini(t))],
        ["run_dir", "a_file.txt"]),
    "eval --out is an existing file": (
        lambda t: ["eval", *eval_args(_mini(t)), "--out", str(_file(t))],
        ["a_file.txt", "not a folder"]),
    "data.root is a file": (lambda t: eval_args(_file(t)), ["a_file.txt"]),
    "config path is a folder": (lambda t: [str(t)], ["a folder, not a config file"]),
    # configs
    "config: empty file": (lambda t: [cfg_file(t, "")], ["empty"]),
    "config: only a comment": (lambda t: [cfg_file(t, "# nothing here\n")], ["empty"]),
    "config: binary file": (lambda t: [cfg_file(t, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")],
                            ["bad.yaml"]),
    "config: a scalar, not a mapping": (lambda t: [cfg_file(t, "hello\n")], ["mapping"]),
    "config: duplicate key": (
        lambda t: [cfg_file(t, "eval:\n  batch_size: 8\n  batch_size: 16\n")],
        ["eval.batch_size", "twice", "lines 2 and 3"]),
    "config: duplicate section": (
        lambda t: [cfg_file(t, "eval:\n  batch_size: 8\nseed: 1\neval:\n  limit: 2\n")],
        ["'eval'", "lines 1 and 4"]),
    "config: a section given a value": (lambda t: ["eval=3"], ["eval"]),
    # checkpoints
    "checkpoint: processor missing": (
        lambda t: ["eval", *eval_args(_mini(t)), *_checkpoint(t, PLAIN[0], lambda f: [
            (f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json",
                                       "processor_config.json") if (f / n).exists()])],
        ["ckpt", "processor"]),
    "checkpoint: truncated safetensors": (
        lambda t: ["eval", *eval_args(_mini(t)), *_checkpoint(
            t, PLAIN[0], lambda f: _truncate(f / "model.safetensors"))],
        ["ckpt", "cannot load the model"]),
    "checkpoint: config.json not JSON": (
        lambda t: ["eval", *eval_args(_mini(t)), *_checkpoint(
            t, PLAIN[0], lambda f: (f / "config.json").write_text("{oops"))],
        ["ckpt"]),
    "checkpoint: a file, not a folder": (
        lambda t: ["eval", *eval_args(_mini(t)), "--model", str(_file(t))],
        ["a_file.txt"]),
    # data
    "split name that does not exist": (
        lambda t: ["eval", *eval_args(_mini(t)), "--split", "nosuch"], ["nosuch"]),
    "seed split that does not exist": (
        lambda t: ["run", *eval_args(_mini(t)), "data.seed_split=nosuch"], ["nosuch"]),
    "problems.json with non-UTF-8 bytes in a string": (
        lambda t: eval_args((lambda r: ((r / "problems.json").write_bytes(
            (r / "problems.json").read_bytes().replace(b'"question": "', b'"question": "\xe9', 1)),
            r)[1])(_mini(t))), ["problems.json", "UTF-8"]),
    "pid_splits.json is a list": (
        lambda t: eval_args((lambda r: ((r / "pid_splits.json").write_text("[1, 2]"), r)[1])(
            _mini(t))), ["pid_splits.json", "expected an object"]),
    "checkpoint: a teacher whose every answer is unparsable": (
        lambda t: ["run", *eval_args(_mini(t)), f"teacher.path={PLAIN[0]}",
                   f"student.path={PLAIN[0]}", "loop.strategy=none", "loop.iterations=1",
                   "align.train.max_steps=1", "imitate.max_new_tokens=4",
                   "data.probe_split=test"],
        ["iter_1/imitate", "nothing to train on"]),
    "pool: unreadable image file": (lambda t: _pool_image(t, b"\x89PNG not an image"),
                                    ["p0.png"]),
    "pool: decompression bomb (30000 x 30000 PNG)": (
        lambda t: _pool_image(t, bomb_png()), ["p0.png", "30000 x 30000",
                                               "data.max_image_pixels"]),
    "scienceqa: decompression bomb in the test split (30000 x 30000 PNG)": (
        _bomb_in_test_split, ["image.png", "30000 x 30000", "data.max_image_pixels"]),
    "scienceqa: image over a lowered data.max_image_pixels": (
        lambda t: eval_args(_mini(t), "data.max_image_pixels=100"),
        ["image.png", "over the limit of 100", "data.max_image_pixels"]),
    "pool: image file missing": (
        lambda t: (lambda a: ((t / "sqa" / "pool" / "p0.png").unlink(), a)[1])(
            _pool_image(t, b"")), ["p0.png"]),
}
CASES.update(MORE_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_loses_nothing(name, tmp_path, capsys, request):
    setup, words = CASES[name]
    if name.startswith("checkpoint:"):
        PLAIN[:] = [request.getfixturevalue("plain_llava")]
    argv = setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_result.json").write_text('{"acc": 50.0}')  # something computed before
    if argv and argv[0] == "run":
        argv = ["run", f"run_dir={out}", *argv[1:]]
        cmd = argv
    elif argv and argv[0] == "eval":
        cmd = [*argv, "eval.limit=4"]
        cmd += [] if "--model" in argv else ["--model", "builtin:student"]
        cmd += [] if "--out" in argv else ["--out", str(out)]
    elif argv and argv[0].endswith(".yaml"):
        cmd = ["eval", argv[0], *argv[1:], "--model", "builtin:student", "--out", str(out)]
    else:
        cmd = ["eval", *argv, "eval.limit=4", "--model", "builtin:student", "--out", str(out)]
    code = main(cmd)
    err = capsys.readouterr().err.strip().splitlines()
    mine = [line for line in err if line.startswith("mmdc:")]
    assert code == 2, (name, err[-3:])
    assert mine == [err[-1]] and "Traceback" not in "\n".join(err), err[-5:]
    for w in words:
        assert w in mine[0], (name, mine[0])
    assert (out / "earlier_result.json").read_text() == '{"acc": 50.0}'
    assert not list(out.glob("student_*"))  # no partial results written


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25 + 15


@pytest.mark.parametrize("text", [
    "", "\x00\x00\x00", "Question: " + "x" * 100_000, "Options: (A) only options",
    "Question: ¿Qué?\nOptions: (A) 🐱 (B) 🐟\nAnswer: C\nSolution: —",
    "Question: q\nOptions: (A) a (A) a\nAnswer: A",
])
def test_bad_teacher_output_is_a_counted_drop(text):
    from mmdc.data.record import Instance
    from mmdc.stages.generate import generate_instances
    from mmdc.stages.seeds import Seed

    seed = Seed(Instance(id="s", question="q", choices=["a", "b"], answer=0, skill="color"),
                "same", None)
    teacher = SimpleNamespace(generate=lambda reqs, **kw: [text] * len(reqs))
    accepted, rejected, report = generate_instances(teacher, teacher, [seed], lambda r: None,
                                                    existing=[], iteration=1, k=2)
    assert accepted == [] and report.accepted == 0
    assert sum(report.to_dict()["dropped"].values()) == 1 and len(rejected) == 1


def test_unicode_and_huge_text_are_not_errors(tmp_path, capsys):
    """Not bad input: unicode everywhere and a very long question evaluate normally."""
    root = _mini(tmp_path)
    _edit(root, lambda p: p[_image_pid(root)].update(question="¿Cuál? 猫 🐱 " + "x " * 5000))
    assert main(["eval", *eval_args(root), "eval.limit=4", "--model", "builtin:student",
                 "--out", str(tmp_path / "out")]) == 0
    Image.open(root / "images" / "test" / _image_pid(root) /
               _problems(root)[_image_pid(root)]["image"]).verify()
