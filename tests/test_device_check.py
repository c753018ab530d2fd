"""benchmarks/device_check.py on CPU: the wheel-folder check against a generated fake folder,
the dry run's JSON (structure, "dry_run": true, written outside benchmarks/results/), and a
missing wheel reported by name."""

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
PHASES = ["env", "wheels", "install", "build", "extension", "gpu_tests", "benchmarks", "main_job",
          "vllm_rollout", "kernel_tests"]
STANDIN = REPO / "tests" / "vllm_standin"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dc = _load()


def _version_for(requirement: str) -> str:
    """A version satisfying ``requirement``: the installed one when it does, else a guess."""
    pk = dc._packaging()
    spec = pk.Requirement(requirement).specifier
    try:
        v = md.version(pk.Requirement(requirement).name)
        if spec.contains(v, prereleases=True):
            return v.split("+")[0]
    except md.PackageNotFoundError:
        pass
    for v in ("99.0.0", "4.0.0", "1.99.0", "0.99.0"):
        if spec.contains(v):
            return v
    raise AssertionError(f"no test version for {requirement}")


def fake_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal, valid pure-Python wheel: METADATA (with Requires-Dist), WHEEL, RECORD."""
    stem = name.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{stem}/__init__.py", "")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def folder(tmp_path):
    """A wheel for every requirement of the device check; tyro needs docstring-parser, whose wheel
    is there too, and requires a package only under an extra and one only on Windows."""
    w = tmp_path / "wheels"
    w.mkdir()
    for r in dc.required_set(REPO):
        name = dc.req_name(r)
        req = ["docstring-parser>=0.16", "nonexistent-dev-only; extra == 'dev'",
               "nonexistent-win-only; sys_platform == 'win32'"] if name == "tyro" else []
        fake_wheel(w, name, _version_for(r), req)
    fake_wheel(w, "docstring-parser", "0.18.0")
    return w


def test_required_set_comes_from_setup_py_without_torch_and_triton():
    names = [dc.req_name(r) for r in dc.required_set(REPO)]
    assert "torch" not in names and "triton" not in names
    for n in ("megatron-core", "liger-kernel", "tyro", "safetensors", "numpy", "pytest",
              "pytest-benchmark", "hypothesis", "transformers", "pyarrow", "matplotlib", "tqdm",
              "pybind11", "setuptools", "cmake"):
        assert n in names, n
    assert len(names) == len(set(names))


def test_complete_folder_passes_and_missing_wheels_are_named(folder):
    rep = dc.check_wheels(folder, dc.required_set(REPO), all_wheels=True)
    assert rep["ok"], rep["problems"]
    by = {e["name"]: e for e in rep["entries"]}
    assert by["docstring-parser"]["required_by"] == "tyro"
    assert "nonexistent-dev-only" not in by and "nonexistent-win-only" not in by
    # a top-level wheel and a transitive one go missing
    next(folder.glob("hypothesis-*.whl")).unlink()
    next(folder.glob("docstring_parser-*.whl")).unlink()
    rep = dc.check_wheels(folder, dc.required_set(REPO), all_wheels=True)
    assert not rep["ok"]
    assert rep["missing"] == ["docstring-parser", "hypothesis"]
    assert any("missing wheel: hypothesis" in p for p in rep["problems"])
    assert any("docstring-parser" in p and "required by tyro" in p for p in rep["problems"])


def test_wrong_version_other_interpreter_and_sdist_are_reported(folder):
    for p in folder.glob("tyro-*.whl"):
        p.unlink()
    fake_wheel(folder, "tyro", "2.5.0")  # setup.py wants tyro>=1.0,<2
    for p in folder.glob("pyarrow-*.whl"):
        p.rename(p.with_name(p.name.replace("py3-none-any", "cp27-cp27m-win32")))
    for p in folder.glob("tqdm-*.whl"):
        p.unlink()
    (folder / "tqdm-4.70.0.tar.gz").write_bytes(b"")
    rep = dc.check_wheels(folder, dc.required_set(REPO), all_wheels=True)
    status = {e["name"]: e["status"] for e in rep["entries"]}
    assert status["tyro"] == "version" and status["pyarrow"] == "incompatible"
    assert status["tqdm"] == "sdist"
    assert set(rep["missing"]) == {"tyro", "pyarrow", "tqdm"}


def test_manylinux_platforms_are_expanded():
    plats = dc.manylinux_platforms("2.28", "x86_64")
    assert plats[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in plats
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(plats)


def test_fetch_closure_leaves_out_what_only_torch_needs():
    """From a pip resolution report: torch, triton and what only they need stay out; what
    another package needs too (filelock) and requested extras are kept; other extras are not."""
    def item(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    items = [item("liger-kernel", "0.8.5", "torch>=2.1", "triton>=2.3"),
             item("torch", "2.13.0", "filelock", "sympy>=1.13", "nvidia-nccl-cu13; "
                  "platform_system == 'Linux'"),
             item("triton", "3.9.0"), item("sympy", "1.14.0", "mpmath"), item("mpmath", "1.3.0"),
             item("nvidia-nccl-cu13", "2.30.7"),
             item("transformers", "5.24.0", "huggingface-hub>=1.3", "torch>=2.6; extra == 'torch'"),
             item("huggingface-hub", "2.4.0", "filelock", "rich; extra == 'cli'"),
             item("filelock", "4.3.1"), item("rich", "15.0.0"),
             item("pytest", "9.2.0", "tomli>=2; python_version < '3.0'")]
    keep, graph = dc.closure_without(items, ["liger-kernel", "transformers", "pytest"],
                                     {"torch", "triton"})
    assert set(keep) == {"liger-kernel", "transformers", "huggingface-hub", "filelock", "pytest"}
    assert keep["filelock"] == "4.3.1" and "rich" not in keep
    keep, _ = dc.closure_without(items, ["huggingface-hub[cli]"], {"torch", "triton"})
    assert set(keep) == {"huggingface-hub", "filelock", "rich"}


def test_pytest_output_parsers():
    log = ("tests/test_a.py::test_x PASSED [ 50%]\ntests/test_a.py::test_y FAILED [100%]\n"
           "tests/test_a.py::test_z SKIPPED (needs a CUDA device) [100%]\n"
           "==== 1 failed, 1 passed, 1 skipped in 2.00s ====\n")
    r = dc.parse_pytest_log(log)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 1)
    assert r["failures"] == [{"test": "tests/test_a.py::test_y"}]
    assert r["summary_line"].startswith("1 failed")
    c = dc.parse_collect("$ pytest\ntests/t.py::a\ntests/t.py::b\n\n"
                         "2/9 tests collected (7 deselected) in 1s\n")
    assert c["collected"] == 2 and c["tests"] == ["tests/t.py::a", "tests/t.py::b"]


def _dry_run(folder, tmp_path, *extra, timeout=120, env=None):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--wheels", str(folder), "--out", str(out),
           "--work-dir", str(tmp_path / "work"), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env=None if env is None else {**os.environ, **env})
    files = sorted(out.glob("device-check-*.json"))
    assert len(files) == 1, r.stdout + r.stderr
    return r, json.loads(files[0].read_text())


def _check_structure(res):
    assert res["schema"] == "r4b-device-check/1" and res["dry_run"] is True
    assert list(res["phases"]) == PHASES
    for name, rec in res["phases"].items():
        assert rec["status"] in ("passed", "failed", "timeout", "skipped", "not_run",
                                 "printed"), name
        assert "wall_s" in rec
    env = res["environment"]
    for k in ("python", "torch", "triton", "cuda_runtime", "cuda_available", "r4b_commit",
              "source_digest", "pip"):
        assert k in env, k
    assert res["total_wall_s"] is not None


def test_dry_run_quick_phases(folder, tmp_path):
    """The dry run's static phases (seconds): JSON structure, the pip commands printed with
    --no-index and the carried folder, nothing written to benchmarks/results/."""
    before = set((REPO / "benchmarks" / "results").glob("device-check-*"))
    r, res = _dry_run(folder, tmp_path,
                      "--skip", "gpu_tests,benchmarks,main_job,vllm_rollout,kernel_tests",
                      "--timeout", "wheels=60")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    _check_structure(res)
    ph = res["phases"]
    assert ph["env"]["status"] == "passed" and ph["wheels"]["status"] == "passed"
    assert ph["wheels"]["check"]["missing"] == []
    assert ph["install"]["status"] == "printed" and ph["build"]["status"] == "printed"
    (install,) = ph["install"]["commands"]
    assert "--no-index" in install and str(folder) in install and "megatron-core" in install
    (build,) = ph["build"]["commands"]
    assert all(f in build for f in ("--no-index", "--no-build-isolation", "--no-deps", "-e"))
    assert ph["extension"]["status"] == "passed" and ph["extension"]["HAS_R4B_C"] is True
    assert ph["main_job"]["status"] == "skipped"
    assert "would run:" in r.stdout
    assert set((REPO / "benchmarks" / "results").glob("device-check-*")) == before


def test_dry_run_names_a_missing_wheel(folder, tmp_path):
    next(folder.glob("liger_kernel-*.whl")).unlink()
    r, res = _dry_run(folder, tmp_path, "--only", "env,wheels")
    assert r.returncode == 1
    assert res["ok"] is False
    assert res["phases"]["wheels"]["status"] == "failed"
    assert res["phases"]["wheels"]["check"]["missing"] == ["liger-kernel"]
    assert "missing wheel: liger-kernel" in r.stdout


@pytest.mark.slow
def test_dry_run_every_phase(folder, tmp_path):
    """The whole dry run: tests collected, main job's GPU arguments validated and one tiny BPO
    step run with its report read back."""
    r, res = _dry_run(folder, tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    _check_structure(res)
    ph = res["phases"]
    assert ph["gpu_tests"]["collect"]["collected"] > 0
    assert any("::" in t for t in ph["gpu_tests"]["collect"]["tests"])
    assert ph["benchmarks"]["collect"]["collected"] > 0
    assert ph["kernel_tests"]["collect"]["collected"] > 0
    mj = ph["main_job"]
    assert mj["status"] == "passed" and mj["gpu_args_valid"]
    assert set(mj["report"]) >= {"auto", "think", "no_think"}
    assert mj["last_metrics"]["step"] == 1


# ---------------------------------------------------------------- the vLLM rollout phase
@pytest.mark.parametrize("version", ["0.10.2", "0.34.0"])
def test_dry_run_vllm_rollout_against_the_standin(tmp_path, version):
    """The phase end to end on CPU, its subprocess importing tests/vllm_standin as ``vllm``:
    three greedy requests (an image, an image with forced tokens, text only) through
    VLLMEngine and EmbeddedEngine on the same weights give the same tokens and log-probs, and
    the record says it was the stand-in."""
    r, res = _dry_run(tmp_path / "wheels", tmp_path, "--only", "vllm_rollout",
                      env={"PYTHONPATH": os.pathsep.join([str(STANDIN)] + [
                          p for p in [os.environ.get("PYTHONPATH")] if p]),
                           "R4B_VLLM_STANDIN_VERSION": version})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rec = res["phases"]["vllm_rollout"]
    assert rec["status"] == "passed", rec.get("error") or rec
    assert rec["vllm_version"] == f"{version}+r4b.standin" and rec["standin"] is True
    assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["ok"] is True
    assert rec["architecture"] == "LlavaOnevisionForConditionalGeneration"
    assert "(stand-in)" in rec["summary_text"]
    for k in ("vllm_import_s", "vllm_init_s", "vllm_generate_s", "embedded_generate_s"):
        assert rec[k] >= 0, k
    # the image processor files vLLM reads give r4b's tiles
    assert rec["processor_tiles"] == rec["r4b_tiles"] and rec["processor_pixels_max_abs_diff"] == 0
    reqs = rec["requests"]
    assert [q["uid"] for q in reqs] == ["image", "image+forced", "text"]
    assert [q["images"] for q in reqs] == [1, 1, 0]
    budget = rec["sampling"]["max_new_tokens_auto"]
    for q in reqs:
        v, e = q["vllm"], q["embedded"]
        assert v["tokens"] == e["tokens"] and q["tokens_equal"] is True
        assert q["agreed_tokens"] == len(v["tokens"]) > len(q["forced_ids"])
        assert len(v["tokens"]) <= budget + len(q["forced_ids"])
        assert v["tokens"][:len(q["forced_ids"])] == q["forced_ids"]
        assert len(v["logprobs"]) == len(e["logprobs"]) == len(v["tokens"])
        diff = max(abs(a - b) for a, b in zip(v["logprobs"], e["logprobs"]))
        assert diff <= 1e-5 and q["logprob_max_abs_diff"] <= rec["logprob_tol"] == 1e-3
        assert all(x <= 0 for x in v["logprobs"])
    assert reqs[1]["forced_ids"] and not reqs[0]["forced_ids"]
    # the image matters: the image prompt and the text prompt answer differently
    assert reqs[0]["vllm"]["tokens"] != reqs[2]["vllm"]["tokens"]


def test_vllm_rollout_comparison_reports_the_first_disagreement():
    """Log-probs are compared only where the tokens agree, and a mismatch is reported."""
    from types import SimpleNamespace as NS

    q = NS(uid=0, mode="auto", images=None, prompt_ids=[1, 2], forced_ids=[])
    got = NS(response_ids=[5, 6, 7, 8], finished=False, behaviour_logprobs=[-1.0, -2.0, -0.5, -3])
    want = NS(response_ids=[5, 6, 9], finished=True, behaviour_logprobs=[-1.25, -2.0, -9.0])
    (row,) = dc.compare_rollouts([q], [got], [want])
    assert row["tokens_equal"] is False and row["agreed_tokens"] == 2
    assert row["logprob_max_abs_diff"] == 0.25  # position 2 (other tokens) is left out
    assert row["vllm"]["tokens"] == [5, 6, 7, 8] and row["embedded"]["finished"] is True
    (row,) = dc.compare_rollouts([q], [want], [NS(response_ids=[4], finished=False,
                                                  behaviour_logprobs=[-1.0])])
    assert row["agreed_tokens"] == 0 and row["logprob_max_abs_diff"] is None


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here: its absence cannot be shown")
def test_dry_run_without_vllm_records_the_phase_as_skipped(tmp_path):
    r, res = _dry_run(tmp_path / "wheels", tmp_path, "--only", "vllm_rollout")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rec = res["phases"]["vllm_rollout"]
    assert rec["status"] == "skipped" and rec["reason"] == "vllm not installed"
    assert "requests" not in rec and "vllm_version" not in rec
    assert res["ok"] is True and res["complete"] is False
    assert "vllm_rollout  skipped" in r.stdout and "vllm not installed" in r.stdout


def test_vllm_rollout_needs_cuda_outside_the_dry_run_and_real_vllm_on_cpu(tmp_path, monkeypatch):
    """Without CUDA the GPU run skips the phase; on CPU only the stand-in runs (a real vLLM
    there would fail to start), and nothing is built before those checks."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    rec = dc.vllm_rollout(tmp_path / "w", cpu=False)
    assert rec == {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text('__version__ = "0.10.2"\n')
    monkeypatch.syspath_prepend(str(fake))
    try:
        rec = dc.vllm_rollout(tmp_path / "w", cpu=True)
    finally:
        sys.modules.pop("vllm", None)  # the fake must not outlive this test
    assert rec["skipped"] == "vllm 0.10.2 needs a CUDA device; none is visible"
    assert not (tmp_path / "w").exists()
