#!/usr/bin/env python3
"""One prepared check of the GPU path on a bare one-GPU machine (torch, triton, nvcc; no network).

    python benchmarks/device_check.py --wheels wheels/ --out benchmarks/results/

Phases, each with its own timeout, the whole inside ``--budget-s`` (480 s by default):

  env           interpreter, torch/CUDA, GPU, driver, nvcc, compiler, Python headers, git commit
  wheels        the wheel folder serves every dependency (setup.py ``install_requires`` + the
                ``test`` extra + the build tools, and what they need) except torch, triton and
                what those need; then pip resolves the set offline (``--dry-run --no-index``)
  install       ``pip install --no-index --find-links <wheels> ...``
  build         ``pip install --no-index --no-build-isolation --no-deps -e kernels -e .``: the packer
                extension, built with this machine's nvcc; torch is never downloaded
  extension     ``r4b.packing.HAS_R4B_C`` and ``HAS_R4B_CUDA`` must both be True
  gpu_tests     ``pytest -m gpu tests benchmarks``
  benchmarks    ``pytest benchmarks --benchmark`` (the gated micro-benchmarks)
  main_job      ``torchrun --nproc-per-node 1 -m r4b.pretrain_bpo --steps 20`` with short annealing
  vllm_rollout  when vLLM is installed: a tiny LLaVA-OneVision r4b model, three greedy requests
                (one image; one image with forced tokens; text only) through ``VLLMEngine`` and
                ``EmbeddedEngine`` on the same weights: tokens and log-probs of both, per
                request; skipped, with the reason, without vLLM or CUDA
  kernel_tests  the kernel test files on the GPU (compiled Triton), in the time that is left

One JSON goes under ``--out`` (``device-check-<gpu>-<date>.json``), rewritten after every
phase, so a phase that fails or runs out of time still leaves the results so far.  A phase past
its timeout is killed with its whole process group and recorded as ``timeout``.

``--dry-run`` (CPU, CI): checks the wheel folder as a bare machine needs it, prints the pip
commands without running them, collects the pytest phases (``--collect-only``), validates the
main job's GPU arguments and runs it for one step at tiny settings, runs the vLLM rollout on
the CPU when the ``vllm`` it imports is r4b's test stand-in (``tests/vllm_standin`` on
``PYTHONPATH``; recorded as ``"standin": true``), and writes the JSON (``"dry_run": true``) into
the work directory unless ``--out`` is given.

``fetch`` (a machine with network): downloads that wheel set for the GPU machine's Python::

    python benchmarks/device_check.py fetch --dest wheels --python-version 3.12 \\
        --platform manylinux_2_28_x86_64

Only the standard library is imported here; r4b, pytest and torch run in subprocesses, after
installation (the vLLM rollout too: ``device_check.py vllm-rollout --work-dir DIR`` is that
subprocess, printing its record as one ``DEVICE_CHECK_JSON=`` line).  Requirements, markers
and wheel tags are read with ``packaging`` as pip carries it (``pip._vendor.packaging``): pip
has to be there to install anything.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import email.parser
import hashlib
import importlib.metadata as _md
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "r4b-device-check/1"
MACHINE_PROVIDED = ("torch", "triton")
# Distributions of this checkout that setup.py names by a direct reference to a folder: the
# build phase installs them from the folder (editable, no index), not from the wheel folder.
LOCAL_DISTS = {"r4b-kernels": "kernels"}
"""Distributions the GPU machine brings: never installed from the folder, never downloaded."""

PHASES = (  # name, timeout in seconds
    ("env", 60), ("wheels", 60), ("install", 150), ("build", 180), ("extension", 30),
    ("gpu_tests", 150), ("benchmarks", 180), ("main_job", 210), ("vllm_rollout", 180),
    ("kernel_tests", 120))
BUDGET_S = 480
NEEDS = {"install": "wheels", "build": "install", "extension": "build", "gpu_tests": "build",
         "benchmarks": "build", "main_job": "build", "vllm_rollout": "build",
         "kernel_tests": "build"}
KERNEL_TEST_FILES = ("tests/test_policy_loss.py", "tests/test_grouped_advantage.py")

# Sized for about 3 minutes on one H100 (not yet measured on a GPU).  The defaults are 200 / 300 /
# 500 SFT steps, 1200 x 8 curation rollouts, 60 BPO steps and 200 eval items.
MAIN_JOB_ARGS = (
    "--steps", "20", "--eval_every", "10", "--eval_items_during", "50", "--ckpt_every", "20",
    "--anneal.n_train_items", "2000", "--anneal.vision_align_steps", "50",
    "--anneal.warmup_steps", "100", "--anneal.anneal_steps", "100",
    "--anneal.curate_items", "400", "--anneal.curation_samples", "4", "--eval.n_items", "100")
# Dry run: one BPO step at tiny settings (about 30 s on 2 CPU cores).
MAIN_JOB_TINY_ARGS = (
    "--setup.task.vision", "False", "--anneal.n_train_items", "64",
    "--anneal.vision_align_steps", "0", "--anneal.warmup_steps", "2", "--anneal.anneal_steps", "2",
    "--anneal.batch_size", "16", "--anneal.curate_items", "16", "--anneal.curation_samples", "2",
    "--rl.group_size", "2", "--rl.prompts_per_step", "2", "--rl.max_new_tokens_think", "16",
    "--rl.max_new_tokens_auto", "16", "--rl.max_new_tokens_no_think", "8",
    "--eval.n_items", "4", "--eval.max_new_tokens_think", "16", "--eval.max_new_tokens_auto", "16",
    "--eval.max_new_tokens_no_think", "8", "--steps", "1", "--eval_every", "1",
    "--eval_items_during", "4", "--tensorboard", "False")

ENV_PROBE = """\
import json, torch
d = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
     "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
try:
    import triton
    d["triton"] = triton.__version__
except Exception as e:
    d["triton"], d["triton_error"] = None, repr(e)
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(device_name=p.name, capability=f"{p.major}.{p.minor}",
             device_count=torch.cuda.device_count(), memory_gib=round(p.total_memory / 2**30, 1),
             multiprocessors=p.multi_processor_count)
print("DEVICE_CHECK_JSON=" + json.dumps(d))
"""
EXTENSION_PROBE = """\
import json, importlib.metadata as md
import r4b.packing as p, r4b_kernels as k
names = ("megatron-core", "liger-kernel", "transformers", "tokenizers", "safetensors", "tyro",
         "numpy", "pyarrow", "pillow", "matplotlib", "tensorboard", "tqdm", "pytest",
         "pytest-benchmark", "hypothesis", "pybind11", "setuptools", "cmake", "r4b")
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
print("DEVICE_CHECK_JSON=" + json.dumps({"HAS_R4B_C": p.HAS_R4B_C, "HAS_R4B_CUDA": p.HAS_R4B_CUDA,
      "HAS_TRITON_GPU": getattr(k, "HAS_TRITON_GPU", None), "packages": v}))
"""
PARSE_PROBE = """\
import sys
from r4b.config import parse_cli
from r4b.pretrain_bpo import BPOJob
job = parse_cli(BPOJob, sys.argv[1:])
print("validated:", job.steps, "steps")
"""
_PIP_ENV_DROP = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT",
                 "PIP_REQUIREMENT", "PIP_TRUSTED_HOST", "PIP_PROXY")


def say(msg: str) -> None:
    print(f"[device-check] {msg}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(text: str) -> str:
    """The canonical distribution name of a requirement string."""
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text).group(1))


def _packaging():
    """The standalone ``packaging`` package, or the copy pip vendors; None when neither exists.

    The standalone one first: importing ``pip`` in-process makes setuptools' distutils shim
    (``_distutils_hack``, Python < 3.12) stand down for the rest of the process, and a later
    ``import setuptools`` (torch.utils.cpp_extension, via megatron-core) then fails its check
    that distutils is setuptools' own.
    """
    try:
        from packaging import markers, requirements, specifiers, tags, utils, version
    except ImportError:
        try:
            from pip._vendor.packaging import (markers, requirements, specifiers, tags, utils,
                                               version)
        except ImportError:
            return None
    return argparse.Namespace(markers=markers, Requirement=requirements.Requirement,
                              SpecifierSet=specifiers.SpecifierSet, Version=version.Version,
                              tags=tags, utils=utils)


# ---------------------------------------------------------------- requirements
def project_requirements(repo: Path = REPO) -> list[str]:
    """``install_requires`` + the ``test`` extra of setup.py (read, not run), minus torch/triton."""
    tree = ast.parse((repo / "setup.py").read_text())
    calls = [n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    if not calls:
        raise RuntimeError(f"no setup(...) call in {repo / 'setup.py'}")
    kw = {k.arg: k.value for k in calls[0].keywords if k.arg}
    reqs = []
    for node in kw["install_requires"].elts:
        if isinstance(node, ast.JoinedStr):  # f"r4b-kernels @ {folder}": a local distribution
            head = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if req_name(head) not in LOCAL_DISTS:
                raise RuntimeError(f"setup.py: install_requires entry {ast.unparse(node)} is "
                                   f"neither a literal nor one of {sorted(LOCAL_DISTS)}")
            continue
        reqs.append(ast.literal_eval(node))
    reqs += list(ast.literal_eval(kw["extras_require"]).get("test", []))
    return [r.strip() for r in reqs
            if req_name(r) not in MACHINE_PROVIDED and req_name(r) not in LOCAL_DISTS]


def build_requirements(repo: Path = REPO) -> list[str]:
    """pyproject's ``[build-system] requires`` (the build runs without isolation, so they are
    installed first), cmake at CMakeLists' minimum and ninja (the generator when make is absent)."""
    text = (repo / "pyproject.toml").read_text()
    m = re.search(r"^requires\s*=\s*\[(.*?)\]", text, re.M | re.S)
    reqs = re.findall(r"[\"']([^\"']+)[\"']", m.group(1)) if m else ["setuptools>=68", "wheel"]
    cm = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([0-9.]+)",
                   (repo / "CMakeLists.txt").read_text(), re.I)
    return reqs + [f"cmake>={cm.group(1) if cm else '3.18'}", "ninja"]


def required_set(repo: Path = REPO) -> list[str]:
    """Every top-level requirement the folder must serve: build tools first, no duplicates."""
    out, seen = [], set()
    for r in build_requirements(repo) + project_requirements(repo):
        if req_name(r) not in seen:
            seen.add(req_name(r))
            out.append(r)
    return out


# ---------------------------------------------------------------- wheel folder
def _wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist()
                if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not meta:
            return []
        text = z.read(meta[0]).decode("utf-8", "replace")
    return email.parser.HeaderParser().parsestr(text).get_all("Requires-Dist") or []


def scan_folder(folder: Path, pk) -> list[dict]:
    """Wheels (name, version, tags, Requires-Dist of their METADATA) and sdists in ``folder``."""
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.endswith(".whl"):
            try:
                name, ver, _build, tags = pk.utils.parse_wheel_filename(p.name)
                requires = _wheel_requires(p)
            except Exception as e:  # noqa: BLE001 - a bad file is reported, the rest checked
                found.append({"file": p.name, "kind": "bad", "error": str(e)})
                continue
            found.append({"file": p.name, "kind": "wheel", "name": canonical(str(name)),
                          "version": str(ver), "tags": sorted(str(t) for t in tags),
                          "requires": requires})
        elif p.name.endswith((".tar.gz", ".zip")):
            try:
                name, ver = pk.utils.parse_sdist_filename(p.name)
            except Exception:  # noqa: BLE001 - not an sdist of a distribution
                continue
            found.append({"file": p.name, "kind": "sdist", "name": canonical(str(name)),
                          "version": str(ver)})
    return found


def _supported_tags(pk, target_python: str | None) -> set[str]:
    if not target_python:
        return {str(t) for t in pk.tags.sys_tags()}
    v = tuple(int(x) for x in target_python.split(".")[:2])
    plats = list(pk.tags.platform_tags())
    return ({str(t) for t in pk.tags.cpython_tags(v, platforms=plats)}
            | {str(t) for t in pk.tags.compatible_tags(v, platforms=plats)})


def _marker_env(pk, target_python: str | None) -> dict:
    env = dict(pk.markers.default_environment())
    if target_python:
        parts = target_python.split(".")
        env["python_version"] = ".".join(parts[:2])
        env["python_full_version"] = ".".join((parts + ["0"])[:3])
    return env


def _applies(req, env: dict, extras) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""}))


def installed_distributions() -> dict:
    out = {}
    for d in _md.distributions():
        name = d.metadata.get("Name")
        if name:
            out.setdefault(canonical(name), d)
    return out


def machine_closure(pk, env: dict, installed: dict) -> dict:
    """torch, triton and every installed distribution they require: ``{name: version}``."""
    out, todo = {}, list(MACHINE_PROVIDED)
    while todo:
        n = todo.pop()
        if n in out or n not in installed:
            continue
        out[n] = installed[n].version
        for r in installed[n].requires or []:
            try:
                req = pk.Requirement(r)
            except Exception:  # noqa: BLE001 - an unparseable line of someone else's metadata
                continue
            if _applies(req, env, None):
                todo.append(canonical(req.name))
    return out


def _system_tool(name: str, spec) -> str | None:
    """A system binary standing in for the cmake / ninja wheels: a description, or None."""
    if name == "cmake" and shutil.which("cmake"):
        out = subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version\s+([0-9][0-9.]*)", out)
        if m and spec.contains(m.group(1), prereleases=True):
            return f"system cmake {m.group(1)}"
    if name == "ninja":
        for tool in ("make", "ninja"):
            if shutil.which(tool):
                return f"system {tool}"
    return None


def check_wheels(folder: Path, requirements: list[str], *, all_wheels: bool,
                 target_python: str | None = None) -> dict:
    """Walk the dependency closure of ``requirements`` through the wheels in ``folder``.

    A requirement is served by the machine (torch, triton and what they need), by an installed
    distribution that satisfies it and by a system cmake / make for the build tools (both
    unless ``all_wheels``: the folder must serve a bare machine), or by a wheel in the folder
    that this interpreter accepts and whose version fits; that wheel's Requires-Dist are walked
    in turn.  Everything else is reported by name, with what asked for it.
    """
    pk = _packaging()
    if pk is None:
        return {"ok": False, "folder": str(folder), "entries": [], "missing": [],
                "problems": ["neither pip nor packaging is importable by this Python; pip is "
                             "needed to install the wheels (python -m ensurepip --upgrade)"]}
    env = _marker_env(pk, target_python)
    tags = _supported_tags(pk, target_python)
    files = scan_folder(folder, pk)
    by_name: dict = {}
    for f in files:
        if f["kind"] != "bad":
            by_name.setdefault(f["name"], []).append(f)
    installed = installed_distributions()
    machine = machine_closure(pk, env, installed)
    entries, problems, missing = [], [], []
    if not folder.is_dir():
        problems.append(f"wheel folder {folder} does not exist")
    problems += [f"{f['file']}: {f['error']}" for f in files if f["kind"] == "bad"]
    todo, seen = [(r, "r4b") for r in requirements], set()
    extras_of: dict = {}  # the extras each walked distribution was asked for
    while todo:
        text, parent = todo.pop(0)
        try:
            req = pk.Requirement(text)
        except Exception:  # noqa: BLE001 - packaging's InvalidRequirement
            problems.append(f"unparseable requirement {text!r} of {parent}")
            continue
        name, spec, extras = canonical(req.name), req.specifier, set(req.extras)
        key = (name, str(spec), tuple(sorted(extras)))
        if not _applies(req, env, extras_of.get(parent)) or key in seen:
            continue
        seen.add(key)
        e = {"name": name, "requirement": text.split(";")[0].strip(), "required_by": parent}
        entries.append(e)
        if name in MACHINE_PROVIDED or name in machine:
            v = machine.get(name)
            e.update(source="machine", version=v, status="ok")
            if v is None:
                e["status"] = "absent"
                problems.append(f"{name} is not installed; the machine must provide it "
                                f"({e['requirement']}, required by {parent})")
            elif not spec.contains(v, prereleases=True):
                e["status"] = "version"
                problems.append(f"installed {name} {v} does not satisfy {e['requirement']} "
                                f"(required by {parent})")
            continue
        inst = installed.get(name)
        if not all_wheels and inst is not None and spec.contains(inst.version, prereleases=True):
            e.update(source="installed", version=inst.version, status="ok")
            continue
        tool = _system_tool(name, spec) if not all_wheels and name in ("cmake", "ninja") else None
        if tool:
            e.update(source="system", version=tool, status="ok")
            continue
        cands = by_name.get(name, [])
        wheels = [c for c in cands if c["kind"] == "wheel"]
        fitting = [c for c in wheels if tags.intersection(c["tags"])]
        good = [c for c in fitting if spec.contains(c["version"], prereleases=True)]
        if good:
            extras_of[name] = extras_of.get(name, set()) | extras
            best = max(good, key=lambda c: pk.Version(c["version"]))
            e.update(source="wheel", version=best["version"], file=best["file"], status="ok")
            todo += [(r, name) for r in best["requires"]]
            continue
        if fitting:
            e["status"] = "version"
            why = (f"wheel for {name} has version {', '.join(c['version'] for c in fitting)}, "
                   f"{e['requirement']} is needed (required by {parent})")
        elif wheels:
            e["status"] = "incompatible"
            py = target_python or f"{sys.version_info[0]}.{sys.version_info[1]}"
            why = (f"wheel for {name} is not installable by Python {py} on "
                   f"{platform.machine()} ({', '.join(c['file'] for c in wheels)})")
        elif cands:
            e["status"] = "sdist"
            why = (f"{name} is only present as an sdist ({cands[0]['file']}): build its wheel "
                   "with this Python (pip wheel --no-deps <sdist> -w <wheels>)")
        else:
            e["status"] = "missing"
            why = f"missing wheel: {name} ({e['requirement']}, required by {parent})"
        e["problem"] = why
        missing.append(name)
        problems.append(why)
    man = None
    if (folder / "manifest.json").exists():
        try:
            man = json.loads((folder / "manifest.json").read_text())
            present = {f["file"] for f in files}
            problems += [f"{w['file']} is listed in manifest.json but absent"
                         for w in man.get("wheels", []) if w["file"] not in present]
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"unreadable {folder / 'manifest.json'}: {err}")
    return {"ok": not problems, "folder": str(folder), "all_wheels": all_wheels,
            "target_python": target_python or platform.python_version(),
            "wheel_files": sum(1 for f in files if f["kind"] == "wheel"),
            "manifest": man and {k: man.get(k) for k in ("python_version", "platforms", "created")},
            "missing": sorted(set(missing)), "problems": problems, "entries": entries}


# ---------------------------------------------------------------- running commands
def _child_env(extra: dict | None = None, pip: bool = False) -> dict:
    env = dict(os.environ)
    if pip:  # the carried folder only: no config files, no index, no self version check
        for k in _PIP_ENV_DROP:
            env.pop(k, None)
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    scripts = [sysconfig.get_path("scripts")]  # cmake / ninja from their wheels
    try:
        scripts.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    env["PATH"] = os.pathsep.join([s for s in scripts if s] + [env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _display(cmd: list[str]) -> str:
    """The command as printed: an inline ``python -c`` program shows as its first line."""
    if "-c" in cmd[:3]:
        i = cmd.index("-c") + 1
        cmd = cmd[:i] + [cmd[i].splitlines()[0] + " ..."] + cmd[i + 1:]
    return shlex.join(cmd)


class Runner:
    """Runs a command in its own process group, tees its output into a log, enforces a timeout
    (SIGTERM to the group, SIGKILL 5 s later)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.proc = None

    def run(self, cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
        log.parent.mkdir(parents=True, exist_ok=True)
        say(f"  $ {_display(cmd)}")
        t0 = time.monotonic()
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            try:
                self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                fh.write(f"could not start: {e}\n")
                return {"status": "failed", "returncode": None, "wall_s": 0.0}
            pump = threading.Thread(target=self._pump, args=(self.proc.stdout, fh), daemon=True)
            pump.start()
            status, beat = None, t0 + 60
            try:
                while status is None:
                    left = t0 + timeout - time.monotonic()
                    if left <= 0:
                        self._kill()
                        status = "timeout"
                        break
                    try:
                        self.proc.wait(timeout=max(0.1, min(left, beat - time.monotonic())))
                        status = "passed" if self.proc.returncode == 0 else "failed"
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= beat:
                            say(f"  ... running for {time.monotonic() - t0:.0f} s "
                                f"(timeout {timeout:.0f} s)")
                            beat += 60
            except BaseException:  # interrupted: take the children down with us
                self._kill()
                raise
            finally:
                pump.join(timeout=10)
            rc, self.proc = self.proc.returncode, None
            wall = time.monotonic() - t0
            if status == "timeout":
                fh.write(f"\n[device-check] killed after {wall:.0f} s (timeout {timeout:.0f} s)\n")
        return {"status": status, "returncode": rc, "wall_s": round(wall, 2)}

    def _pump(self, stream, fh):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            fh.write(line)
            if self.verbose:
                sys.stdout.write("    " + line)
                sys.stdout.flush()
        stream.close()

    def _kill(self):
        p = self.proc
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p is None or p.poll() is not None:
                return
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout=5)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(read(path).splitlines()[-lines:])


def _probe_json(path: Path) -> dict | None:
    m = re.findall(r"^DEVICE_CHECK_JSON=(.*)$", read(path), re.M)
    return json.loads(m[-1]) if m else None


# ---------------------------------------------------------------- pytest output
_VLINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ .*\d+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s")


def parse_junit(path: Path) -> dict | None:
    """Counts, failing tests with their messages, skip reasons and each test's captured stdout."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
           "errors_list": [], "skip_reasons": {}, "stdout": {}}
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        tid = f"{cls}::{name}" if cls else name
        kinds = {c.tag: c for c in tc}
        if "failure" in kinds or "error" in kinds:
            kind = "failure" if "failure" in kinds else "error"
            out["failed" if kind == "failure" else "errors"] += 1
            out["failures" if kind == "failure" else "errors_list"].append(
                {"test": tid, "message": (kinds[kind].get("message") or "")[:2000]})
        elif "skipped" in kinds:
            out["skipped"] += 1
            why = (kinds["skipped"].get("message") or "").strip()[:300]
            out["skip_reasons"][why] = out["skip_reasons"].get(why, 0) + 1
        else:
            out["passed"] += 1
        so = kinds.get("system-out")
        if so is not None and (so.text or "").strip():
            out["stdout"][tid] = so.text.strip()[-20000:]
    out["total"] = out["passed"] + out["failed"] + out["errors"] + out["skipped"]
    return out


def parse_pytest_log(text: str) -> dict:
    """Counts from ``-v`` result lines and the summary line: a killed run leaves no JUnit file."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "partial": True}
    for line in text.splitlines():
        m = _VLINE.match(line)
        if not m:
            continue
        kind = m.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed",
               "ERROR": "errors"}.get(kind, "skipped")
        out[key] += 1
        if kind == "FAILED":
            out["failures"].append({"test": m.group(1)})
    for line in reversed(text.splitlines()):
        if _SUMMARY.match(line):
            out["summary_line"] = line.strip("= ")
            break
    out["total"] = out["passed"] + out["failed"] + out["errors"] + out["skipped"]
    return out


def parse_collect(text: str) -> dict:
    """``pytest --collect-only -q``: how many tests, their ids, collection errors."""
    ids = [ln.strip() for ln in text.splitlines() if "::" in ln and not ln.startswith(("$", " "))]
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    e = re.search(r"(\d+) errors?", text)
    return {"collected": int(m.group(1)) if m else len(ids), "tests": ids[:500],
            "errors": int(e.group(1)) if e else 0}


# ---------------------------------------------------------------- the check
class Check:
    def __init__(self, args):
        self.a = args
        self.dry = args.dry_run
        self.runner = Runner(args.verbose)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        work = args.work_dir or tempfile.mkdtemp(prefix="r4b-device-check-")
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.out_dir = Path(args.out or (self.work if self.dry else RESULTS)).resolve()
        self.wheels = Path(args.wheels).resolve()
        self.all_wheels = self.dry if args.all_wheels is None else args.all_wheels
        self.py = sys.executable
        self.caps = dict(PHASES)
        for spec in args.timeout or []:
            k, _, v = spec.partition("=")
            if k not in self.caps or not v:
                raise SystemExit(f"--timeout wants PHASE=SECONDS, PHASE one of {list(self.caps)}; "
                                 f"got {spec!r}")
            self.caps[k] = float(v)
        names = [p for p, _ in PHASES]
        self.only = _phase_list(args.only, names) if args.only else names
        self.skip = set(_phase_list(args.skip, names)) if args.skip else set()
        self.install_reqs = None  # the top-level set less what system tools serve (wheels phase)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.path = None
        self.result = {
            "schema": SCHEMA, "dry_run": self.dry, "ok": None, "complete": None,
            "date": self.started.isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv], "budget_s": args.budget_s,
            "work_dir": str(self.work), "wheels_dir": str(self.wheels),
            "environment": {}, "phases": {}, "total_wall_s": None}

    # -- plumbing
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> Path:
        if self.path is None:  # named once the env phase knows the device
            dev = self.result["environment"].get("device_name") or ("cpu" if self.dry else "gpu")
            slug = "".join(c if c.isalnum() else "_" for c in dev).strip("_").lower()
            stamp = self.started.strftime("%Y%m%d-%H%M%S")
            self.path = self.out_dir / f"device-check-{slug}-{stamp}.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.result["total_wall_s"] = round(time.monotonic() - self.t0, 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def cmd(self, phase: str, cmd: list[str], rec: dict, t_end: float, env=None) -> dict:
        """Run ``cmd`` in what is left of the phase's timeout; note it in ``rec['commands']``."""
        left = min(t_end - time.monotonic(), self.left())
        rec.setdefault("commands", []).append(shlex.join(cmd))
        r = {"status": "timeout", "returncode": None, "wall_s": 0.0}
        if left >= 1:
            r = self.runner.run(cmd, self.logs / f"{phase}.log", left, env=env)
        if r["status"] != "passed":
            rec["failed_command"] = shlex.join(cmd)
        return r

    def printed(self, rec: dict, cmd: list[str], env_note: str) -> None:
        say(f"  would run: {env_note}{shlex.join(cmd)}")
        rec["commands"] = [env_note + shlex.join(cmd)]
        rec["status"] = "printed"

    def run(self) -> int:
        say(f"{'dry run' if self.dry else 'GPU check'}: work dir {self.work}, JSON into "
            f"{self.out_dir}, budget {self.a.budget_s:.0f} s")
        phases, blocked = self.result["phases"], None
        try:
            for i, (name, _) in enumerate(PHASES):
                rec = phases[name] = {"status": None, "timeout_s": None, "wall_s": 0.0}
                need = NEEDS.get(name)
                cap = min(self.caps[name], self.left() - 10)
                if name not in self.only or name in self.skip:
                    rec["status"] = "skipped"
                elif blocked:
                    rec.update(status="not_run", reason=blocked)
                elif not self.dry and need and phases[need]["status"] not in ("passed", "skipped"):
                    rec.update(status="not_run", reason=f"{need} did not pass")
                elif cap < 5:
                    rec.update(status="not_run", reason="the check's time budget is spent")
                if rec["status"]:
                    self.write()
                    continue
                rec["timeout_s"] = round(cap, 1)
                say(f"phase {i + 1}/{len(PHASES)} {name} (timeout {cap:.0f} s)")
                t = time.monotonic()
                try:
                    getattr(self, f"phase_{name}")(rec, t + cap)
                except KeyboardInterrupt:
                    rec["status"] = "interrupted"
                    raise
                finally:
                    rec["wall_s"] = round(time.monotonic() - t, 2)
                    if (self.logs / f"{name}.log").exists():
                        rec["log"] = str(self.logs / f"{name}.log")
                    self.write()
                extra = f" ({rec['summary_text']})" if rec.get("summary_text") else ""
                say(f"phase {name}: {rec['status']} in {rec['wall_s']:.1f} s{extra}")
                if rec.get("failed_command") and rec.get("log") and not self.a.verbose:
                    lines = tail(Path(rec["log"]), 15).splitlines()
                    print("\n".join("    | " + ln for ln in lines), flush=True)
                blocked = blocked or rec.get("blocks")
        except KeyboardInterrupt:
            say("interrupted; writing what there is")
            for name, _ in PHASES:
                phases.setdefault(name, {"status": "not_run", "reason": "interrupted",
                                         "wall_s": 0.0})
            self.result["ok"] = False
            say(f"results: {self.write()}")
            return 130
        bad = [n for n, r in phases.items() if r["status"] not in ("passed", "printed", "skipped")]
        self.result["ok"] = not bad
        self.result["complete"] = not any(r["status"] == "skipped" for r in phases.values())
        path = self.write()
        for n, r in phases.items():
            note = r.get("summary_text") or r.get("reason") or ""
            say(f"  {n:<13} {r['status']:<12} {r['wall_s']:7.1f} s  {note}")
        say(("all phases passed" if not bad else "not passed: " + ", ".join(bad))
            + f"; total {self.result['total_wall_s']:.0f} s")
        say(f"results: {path}")
        return 0 if not bad else 1

    # -- phases
    def phase_env(self, rec, t_end):
        e = self.result["environment"]
        blockers, problems = [], []
        e.update(python=platform.python_version(), python_executable=sys.executable,
                 platform=platform.platform(), cpu_count=os.cpu_count())
        e["r4b_commit"] = _git(["rev-parse", "HEAD"])
        st = _git(["status", "--porcelain", "--untracked-files=no"]) if e["r4b_commit"] else None
        e["r4b_dirty"] = None if st is None else bool(st)
        e["source_digest"] = source_digest()
        e["pip"] = _pip_version(self.py)
        if e["pip"] is None:
            blockers.append("pip is not available for this Python (python -m ensurepip --upgrade)")
        managed = Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED"
        if managed.exists() and sys.prefix == sys.base_prefix and \
                not any("break-system-packages" in a for a in self.a.pip_arg or []):
            problems.append(f"{sys.executable} is externally managed: make a venv with "
                            "--system-site-packages (it keeps torch) and run this script with its "
                            "python, or pass --pip-arg=--break-system-packages")
        inc = Path(sysconfig.get_paths()["include"]) / "Python.h"
        e["python_headers"] = inc.exists()
        if not inc.exists():
            problems.append(f"Python headers missing ({inc}): install python"
                            f"{sys.version_info[0]}.{sys.version_info[1]}-dev; the packer "
                            "extension cannot build without them")
        nvcc = shutil.which("nvcc")
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        if nvcc is None and (Path(home) / "bin" / "nvcc").exists():
            nvcc = str(Path(home) / "bin" / "nvcc")
        e["nvcc"] = nvcc
        if nvcc:
            out = _stdout([nvcc, "--version"])
            m = re.search(r"release [0-9.]+, V([0-9.]+)", out)
            e["nvcc_version"] = m.group(1) if m else out.strip()[-80:]
        elif not self.dry:
            problems.append("nvcc not found on PATH or in CUDA_HOME: the CUDA packer module "
                            "(r4b._C_cuda) will not be built")
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        e["cxx"] = cxx and _stdout([cxx, "--version"]).split("\n")[0]
        if not cxx:
            problems.append("no C++ compiler (c++, g++ or clang++) on PATH: the extension "
                            "cannot build")
        e["cmake"] = shutil.which("cmake") and _stdout(["cmake", "--version"]).split("\n")[0]
        e["make"], e["ninja"] = shutil.which("make"), shutil.which("ninja")
        e["build_env"] = {k: v for k, v in os.environ.items()
                          if k.startswith(("R4B_", "TRITON_", "CUDA_HOME", "CUDA_VISIBLE"))}
        if shutil.which("nvidia-smi"):
            q = _stdout(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                         "--format=csv,noheader"]).strip()
            if q:
                e["nvidia_smi"] = q
                e["driver"] = (q.splitlines()[0].split(",") + ["", ""])[1].strip() or None
        r = self.cmd("env", [self.py, "-c", ENV_PROBE], rec, t_end, env=_child_env())
        d = _probe_json(self.logs / "env.log")
        if r["status"] != "passed" or d is None:
            blockers.append("torch is not importable by this Python (the machine must provide "
                            "torch and triton): " + tail(self.logs / "env.log", 3))
        else:
            e.update(d)
            if not d.get("triton"):
                blockers.append(f"triton is not importable: {d.get('triton_error')}")
            if not d["cuda_available"] and not self.dry:
                blockers.append("torch sees no CUDA device (torch.cuda.is_available() is False); "
                                "without a GPU use --dry-run")
        rec.update(blockers=blockers, problems=problems)
        if blockers:
            rec["blocks"] = "env: " + "; ".join(blockers)
        rec["status"] = "failed" if blockers or problems else "passed"
        for msg in blockers + problems:
            say(f"  ! {msg}")
        rec["summary_text"] = (f"{e.get('device_name', 'no GPU')}, torch {e.get('torch')}, "
                               f"CUDA {e.get('cuda_runtime')}, Python {e['python']}")

    def _pip(self, *args) -> list[str]:
        return [self.py, "-m", "pip", "install", "--no-index", *args, *(self.a.pip_arg or [])]

    def _deps_cmd(self) -> list[str]:
        reqs = self.install_reqs if self.install_reqs is not None else required_set(REPO)
        return self._pip("--find-links", str(self.wheels), "--progress-bar", "off", *reqs)

    def phase_wheels(self, rec, t_end):
        reqs = required_set(REPO)
        rep = rec["check"] = check_wheels(self.wheels, reqs, all_wheels=self.all_wheels,
                                          target_python=self.a.target_python)
        system = {x["name"] for x in rep["entries"] if x.get("source") == "system"}
        self.install_reqs = [r for r in reqs if req_name(r) not in system]
        for p in rep["problems"]:
            say(f"  ! {p}")
        from_wheels = sum(1 for x in rep["entries"] if x.get("source") == "wheel")
        rec["summary_text"] = (f"{len(rep['entries'])} requirements, {from_wheels} from wheels, "
                               f"{len(rep['missing'])} missing")
        rec["status"] = "passed" if rep["ok"] else "failed"
        pip_v = self.result["environment"].get("pip") or _pip_version(self.py) or "0"
        if not rep["ok"] or self.a.target_python or _vtuple(pip_v) < (22, 2):
            return  # pip's own offline resolution needs pip >= 22.2 and this interpreter
        plan = self.work / "pip-resolve.json"
        deps = self._deps_cmd()
        resolve = deps[:4] + ["--dry-run", "--quiet", "--report", str(plan)] + deps[4:]
        r = self.cmd("wheels", resolve, rec, t_end, env=_child_env(pip=True))
        names = _unresolved(self.logs / "wheels.log")
        rec["pip_resolve"] = {"status": r["status"], "unresolved": names}
        if names:
            say("  ! pip cannot resolve offline: " + ", ".join(names))
        try:
            rec["pip_resolve"]["would_install"] = [
                f"{i['metadata']['name']}=={i['metadata']['version']}"
                for i in json.loads(plan.read_text()).get("install", [])]
        except (OSError, ValueError, KeyError):
            pass
        rec["status"] = r["status"]

    def phase_install(self, rec, t_end):
        deps = self._deps_cmd()
        if self.dry:
            return self.printed(rec, deps, "PIP_CONFIG_FILE=/dev/null ")
        r = self.cmd("install", deps, rec, t_end, env=_child_env(pip=True))
        rec.update(status=r["status"], returncode=r["returncode"])
        missing = _unresolved(self.logs / "install.log")
        if missing:
            rec["missing"] = missing
            say("  ! no wheel for: " + ", ".join(missing))

    def phase_build(self, rec, t_end):
        local = [a for d in LOCAL_DISTS.values() for a in ("-e", str(REPO / d))]
        build = self._pip("--no-build-isolation", "--no-deps", "-v", *local, "-e", str(REPO))
        # without make, CMake generates for ninja (a system one or the ninja wheel's)
        no_make = not shutil.which("make", path=_child_env()["PATH"])
        extra = rec["build_env"] = {"CMAKE_GENERATOR": "Ninja"} if no_make else {}
        if self.dry:
            note = "".join(f"{k}={v} " for k, v in extra.items())
            return self.printed(rec, build, "PIP_CONFIG_FILE=/dev/null " + note)
        r = self.cmd("build", build, rec, t_end, env=_child_env(extra, pip=True))
        rec.update(status=r["status"], returncode=r["returncode"])
        m = re.search(r"r4b: CUDA kernels were not built \(([^)]*)\)",
                      read(self.logs / "build.log"))
        rec["cuda_kernels_built"] = m is None if r["status"] == "passed" else None
        if m:
            say(f"  ! CUDA kernels were not built: {m.group(1)}")

    def phase_extension(self, rec, t_end):
        r = self.cmd("extension", [self.py, "-c", EXTENSION_PROBE], rec, t_end, env=_child_env())
        d = _probe_json(self.logs / "extension.log")
        if r["status"] != "passed" or d is None:
            rec["status"] = "timeout" if r["status"] == "timeout" else "failed"
            return
        self.result["environment"]["packages"] = d.pop("packages")
        rec.update(d)
        rec["summary_text"] = f"HAS_R4B_C={d['HAS_R4B_C']} HAS_R4B_CUDA={d['HAS_R4B_CUDA']}"
        ok = d["HAS_R4B_C"] and (self.dry or d["HAS_R4B_CUDA"])
        rec["status"] = "passed" if ok else "failed"
        if not ok:
            say("  ! HAS_R4B_C and HAS_R4B_CUDA must both be True on the GPU (see the build log)")

    def _pytest(self, name: str, rec: dict, t_end: float, args: list[str]) -> dict | None:
        cmd = [self.py, "-m", "pytest", "-p", "no:cacheprovider"]
        log = self.logs / f"{name}.log"
        if self.dry:
            r = self.cmd(name, cmd + ["--collect-only", "-q", *args], rec, t_end, env=_child_env())
            c = rec["collect"] = parse_collect(read(log))
            rec["summary_text"] = f"{c['collected']} tests collected"
            none = r["status"] == "passed" and not c["collected"]
            rec["status"] = "failed" if none else r["status"]
            return None
        xml = self.work / f"junit-{name}.xml"
        cmd += ["-v", "-rA", "--junitxml", str(xml), "-o", "junit_logging=system-out", *args]
        r = self.cmd(name, cmd, rec, t_end, env=_child_env())
        res = parse_junit(xml) if r["status"] != "timeout" else None
        res = res or parse_pytest_log(read(log))  # killed: counts from the -v lines so far
        rec.update(tests=res, returncode=r["returncode"])
        rec["summary_text"] = (f"{res['passed']} passed, {res['failed']} failed, "
                               f"{res['errors']} errors, {res['skipped']} skipped"
                               + (" (partial)" if res.get("partial") else ""))
        if r["status"] == "timeout":
            rec["status"] = "timeout"
        else:
            rec["status"] = "passed" if r["returncode"] == 0 and res["passed"] > 0 else "failed"
        for f in res["failures"] + res.get("errors_list", []):
            say(f"  ! {f['test']}: {f.get('message', '')[:200]}")
        return res

    def phase_gpu_tests(self, rec, t_end):
        res = self._pytest("gpu_tests", rec, t_end, ["-m", "gpu", "tests", "benchmarks"])
        if res and any("needs a CUDA device" in k for k in res.get("skip_reasons", {})):
            say("  ! tests were skipped with 'needs a CUDA device': pytest did not see CUDA")
            rec["status"] = "failed"

    def phase_benchmarks(self, rec, t_end):
        before = {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")}
        bj = self.work / "pytest-benchmark.json"
        res = self._pytest("benchmarks", rec, t_end,
                           ["benchmarks", "--benchmark", "--benchmark-json", str(bj)])
        if self.dry:
            return
        # what the benchmarks recorded (benchmarks/_harness.record) and printed
        rec["recorded"] = {}
        for p in sorted(RESULTS.glob("*.json")):
            if not p.name.startswith("device-check-") and before.get(p.name) != p.stat().st_mtime:
                try:
                    rec["recorded"][p.name] = json.loads(p.read_text())
                except ValueError:
                    rec["recorded"][p.name] = read(p)[:20000]
        rec["printed"] = (res or {}).get("stdout", {})
        rec["printed_lines"] = [
            ln for ln in read(self.logs / "benchmarks.log").splitlines()
            if re.match(r"^\s*(\[(?!device-check)[a-z_ ]+\]|recorded |-> |grouped_advantage:)", ln)]
        if bj.exists():
            try:
                rec["pytest_benchmark"] = json.loads(bj.read_text()).get("benchmarks", [])
            except ValueError:
                pass

    def _torchrun(self, out_dir: Path, args) -> list[str]:
        return [self.py, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                "--master-port", str(_free_port()), "-m", "r4b.pretrain_bpo", *args,
                "--out_dir", str(out_dir)]

    def phase_main_job(self, rec, t_end):
        out_dir = self.work / "main_job"
        args = rec["args"] = list(MAIN_JOB_ARGS)
        if self.dry:  # the GPU arguments parse and validate; then one tiny step runs for real
            r = self.cmd("main_job", [self.py, "-c", PARSE_PROBE, *args, "--out_dir", str(out_dir)],
                         rec, t_end, env=_child_env())
            rec["gpu_args_valid"] = r["status"] == "passed"
            if r["status"] != "passed" or self.a.dry_run_main == "parse":
                rec["status"] = r["status"]
                rec["commands"].append("(not run) " + shlex.join(self._torchrun(out_dir, args)))
                return
            args = rec["dry_run_args"] = list(MAIN_JOB_TINY_ARGS)
        r = self.cmd("main_job", self._torchrun(out_dir, args), rec, t_end,
                     env=_child_env({"R4B_NO_PROGRESS": "1"}))
        rec.update(status=r["status"], returncode=r["returncode"], job_wall_s=r["wall_s"],
                   out_dir=str(out_dir))
        m = re.findall(r"main job done in ([0-9.]+) s", read(self.logs / "main_job.log"))
        if m:
            rec["reported_wall_s"] = float(m[-1])
        for key, path in (("report", out_dir / "report" / "report.json"),
                          ("anneal_report", out_dir / "anneal" / "report" / "report.json")):
            if path.exists():
                rec[key] = json.loads(path.read_text())
        lines = read(out_dir / "metrics.jsonl").splitlines()
        if lines:
            rec["last_metrics"] = json.loads(lines[-1])
        if "report" in rec:
            a = rec["report"].get("auto", {}).get("all", {})
            rec["summary_text"] = (f"auto accuracy {a.get('accuracy')}, think rate "
                                   f"{a.get('think_rate')}, job {r['wall_s']:.0f} s")
        elif r["status"] == "passed":
            rec["status"] = "failed"
            say(f"  ! {out_dir / 'report' / 'report.json'} was not written")

    def phase_vllm_rollout(self, rec, t_end):
        """The rollout runs in its own process (it imports torch, r4b and vLLM); its record is
        this phase's.  No vLLM (or no CUDA outside the dry run): ``skipped`` with the reason."""
        cmd = [self.py, str(Path(__file__).resolve()), "vllm-rollout",
               "--work-dir", str(self.work / "vllm_rollout")] + (["--cpu"] if self.dry else [])
        r = self.cmd("vllm_rollout", cmd, rec, t_end, env=_child_env({"R4B_NO_PROGRESS": "1"}))
        d = _probe_json(self.logs / "vllm_rollout.log")
        if d is None:  # killed, or died before printing its record
            rec.update(status=r["status"] if r["status"] == "timeout" else "failed",
                       returncode=r["returncode"], error=tail(self.logs / "vllm_rollout.log", 20))
            return
        rec.update(d, returncode=r["returncode"])
        if d.get("skipped"):
            rec.update(status="skipped", reason=d["skipped"])
            return
        rec["status"] = "passed" if r["status"] == "passed" and d.get("ok") else "failed"
        if d.get("error"):
            say(f"  ! {d['error'].splitlines()[0][:300]}")
        if "requests" in d:
            eq = sum(1 for q in d["requests"] if q["tokens_equal"])
            lp = d.get("logprob_max_abs_diff")
            rec["summary_text"] = (
                f"vLLM {d['vllm_version']}{' (stand-in)' if d.get('standin') else ''}: "
                f"{eq}/{len(d['requests'])} requests with equal tokens, max |d log-prob| "
                + ("n/a" if lp is None else f"{lp:.2g}") + f" (tolerance {d['logprob_tol']:g})")

    def phase_kernel_tests(self, rec, t_end):
        self._pytest("kernel_tests", rec, t_end, ["-m", "not slow", *KERNEL_TEST_FILES])


# ---------------------------------------------------------------- helpers
def _phase_list(text: str, names) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in names]
    if bad:
        raise SystemExit(f"unknown phase(s) {bad}; the phases are {list(names)}")
    return out


def _stdout(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _git(args) -> str | None:
    if not shutil.which("git"):
        return None
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _unresolved(log: Path) -> list[str]:
    """The requirements pip named as unavailable (``--no-index``: no wheel in the folder)."""
    return re.findall(r"No matching distribution found for (\S+)", read(log))


def _pip_version(py: str) -> str | None:
    out = _stdout([py, "-m", "pip", "--version"]).split()
    return out[1] if len(out) > 1 and out[0] == "pip" else None


def _vtuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def source_digest() -> str:
    """sha256 over the project's sources: names the code where there is no git history."""
    h = hashlib.sha256()
    files = [REPO / f for f in ("setup.py", "pyproject.toml", "CMakeLists.txt", "conftest.py")]
    for top in ("r4b", "kernels", "csrc", "benchmarks", "tests"):
        files += sorted(p for p in (REPO / top).rglob("*")
                        if p.suffix in (".py", ".cpp", ".cu", ".h")
                        and "__pycache__" not in p.parts)
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- vLLM rollout (own process)
VLLM_ROLLOUT_IMAGE = (19, 13)
"""(height, width) of the rollout's image: odd and not square (AnyRes unpadding), a grid vLLM's
LLaVA-OneVision class counts as r4b does."""
VLLM_ROLLOUT_NEW_TOKENS = 8
VLLM_LOGPROB_TOL = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
"""Largest |log-prob difference| between the engines, per model dtype, that the phase passes:
two implementations of the same network (bf16: about 3 significant digits on logits of a few
units).  Not yet measured on a GPU."""
STANDIN_SUFFIX = "+r4b.standin"
"""How the ``__version__`` of r4b's test stand-in for vLLM (``tests/vllm_standin``) ends."""
# The rollout model's token ids (vocabulary 64): what the requests and the processor share.
_TOK_IM_START, _TOK_IM_END, _TOK_THINK, _TOK_VIDEO, _TOK_IMAGE = 2, 3, 4, 62, 63
_ROLLOUT_VOCAB = 64


def rollout_model_config(dtype: str):
    """The smallest LLaVA-OneVision network vLLM serves through r4b's ``config.json``: AnyRes
    on 8-pixel tiles of 4 patches, ``anyres_max_9`` (vLLM's class hard-codes it), no projector
    pre-norm (``LlavaOnevisionForConditionalGeneration``, native in vLLM and transformers),
    head sizes 64 (text) and 32 (vision), which every vLLM attention backend takes."""
    from r4b.models import LMConfig, ModelConfig
    from r4b.models.vision import VisionConfig

    pins = tuple((h, w) for h in (8, 16, 24) for w in (8, 16, 24)) + ((32, 32),)
    return ModelConfig(
        lm=LMConfig(vocab_size=_ROLLOUT_VOCAB, hidden_size=128, intermediate_size=256,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                    max_position_embeddings=512),
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                            patch_size=4, image_size=8, feature_layer=2),
        image_token_id=_TOK_IMAGE, image_newline=True, image_layout="anyres",
        projector_pre_norm=False, image_grid_pinpoints=pins, vision_aspect_ratio="anyres_max_9",
        params_dtype=dtype)


def write_rollout_processor(folder: Path, cfg) -> Path:
    """A Hugging Face tokenizer (word-level, one token per id of ``cfg``'s vocabulary, ``<image>``
    and ``<video>`` at their ids) and LLaVA-OneVision image processor (``cfg``'s tile size,
    pinpoints and normalisation) for the rollout model: the files vLLM's processor reads.  Made
    with this machine's transformers, so its own version reads them."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {_TOK_VIDEO: "<video>", _TOK_IMAGE: "<image>", 0: "<pad>", 1: "<|endoftext|>",
             _TOK_IM_START: "<|im_start|>", _TOK_IM_END: "<|im_end|>", _TOK_THINK: "<think>"}
    vocab = {names.get(i, f"<t{i}>"): i for i in range(cfg.lm.vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = [names[i] for i in sorted(names)]
    raw.add_special_tokens(special)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<pad>",
                                               pad_token="<pad>", eos_token="<|im_end|>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    s = cfg.vision.image_size
    image = transformers.LlavaOnevisionImageProcessor(
        size={"height": s, "width": s},
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), do_pad=True)
    image.save_pretrained(str(folder))
    tokens_per_tile = (s // cfg.vision.patch_size) ** 2
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": tokens_per_tile,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": cfg.vision_aspect_ratio}, indent=1) + "\n")
    return folder


def rollout_requests(cfg, seed: int = 0) -> list:
    """Three requests: one image (auto mode), the same image with forced tokens (think mode:
    their log-probs come from vLLM's prompt log-probs), text only (auto mode)."""
    import torch
    from r4b.data.images import prompt_image_tokens
    from r4b.rollout import RolloutRequest

    g = torch.Generator().manual_seed(seed)
    h, w = VLLM_ROLLOUT_IMAGE
    # values k / 255: the image is the same for both engines after vLLM's uint8 conversion
    image = torch.randint(0, 256, (3, h, w), generator=g).float() / 255
    (n,) = prompt_image_tokens([(h, w)], cfg)
    text = torch.randint(10, 60, (6,), generator=g).tolist()
    with_image = [_TOK_IM_START] + [_TOK_IMAGE] * n + text[:4]
    return [RolloutRequest(prompt_ids=with_image, mode="auto", images=[image], uid="image"),
            RolloutRequest(prompt_ids=with_image, mode="think", images=[image],
                           forced_ids=[_TOK_THINK, text[4]], uid="image+forced"),
            RolloutRequest(prompt_ids=[_TOK_IM_START] + text, mode="auto", uid="text")]


def _rollout_fields(r) -> dict:
    return {"tokens": [int(t) for t in r.response_ids], "finished": bool(r.finished),
            "logprobs": [round(float(x), 6) for x in r.behaviour_logprobs]}


def compare_rollouts(requests, got, want) -> list[dict]:
    """Per request: both engines' tokens, whether they are equal, how many leading tokens agree
    and the largest |behaviour log-prob difference| over those (None when none agree)."""
    out = []
    for q, a, b in zip(requests, got, want, strict=True):
        ta, tb = a.response_ids, b.response_ids
        agree = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        diffs = [abs(x - y) for x, y in zip(a.behaviour_logprobs[:agree],
                                            b.behaviour_logprobs[:agree])]
        out.append({"uid": q.uid, "mode": q.mode,
                    "images": 0 if q.images is None else len(q.images),
                    "prompt_tokens": len(q.prompt_ids), "forced_ids": list(q.forced_ids),
                    "vllm": _rollout_fields(a), "embedded": _rollout_fields(b),
                    "tokens_equal": list(ta) == list(tb), "agreed_tokens": agree,
                    "logprob_max_abs_diff": max(diffs) if diffs else None})
    return out


def _processor_pixels(model_dir: Path, image, cfg) -> dict:
    """The image processor vLLM loads from ``model_dir`` against r4b's tiles of ``image``."""
    import numpy as np
    import transformers
    from r4b.data.images import process_image
    from r4b.rollout.vllm_engine import to_pil

    pil = to_pil(image, "image")
    proc = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
    theirs = np.asarray(proc(images=[pil], return_tensors="np")["pixel_values"],
                        dtype=np.float32)[0]
    ours = process_image(pil, cfg).pixel_values
    d = {"processor_class": type(proc).__name__, "processor_tiles": list(theirs.shape),
         "r4b_tiles": list(ours.shape)}
    if theirs.shape == ours.shape:
        d["processor_pixels_max_abs_diff"] = float(np.abs(theirs - ours).max())
    return d


def vllm_rollout(work: Path, *, cpu: bool) -> dict:
    """The vLLM rollout phase's record (run in its own process; see the module docstring).

    Without vLLM: ``{"skipped": "vllm not installed"}``; without CUDA: skipped too, unless
    ``cpu`` (the dry run) and the ``vllm`` imported is r4b's test stand-in.  Otherwise a tiny
    LLaVA-OneVision r4b model (:func:`rollout_model_config`, bf16 on the GPU) and its processor
    files, the requests of :func:`rollout_requests` under greedy decoding at temperature 1,
    through ``EmbeddedEngine`` and ``VLLMEngine`` on the same weights; ``ok`` when every
    request's tokens are equal and the log-probs within :data:`VLLM_LOGPROB_TOL`.  An error
    ends the record with ``error`` (what ran before it stays)."""
    import importlib.util

    rec: dict = {"ok": False}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm not installed"}
    import torch

    rec["cuda_available"] = torch.cuda.is_available()
    if not rec["cuda_available"] and not cpu:
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    import dataclasses
    import traceback

    t0 = time.perf_counter()
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - installed but broken (CUDA / torch mismatch)
        return {**rec, "error": f"import vllm failed: {type(e).__name__}: {e}\n"
                                + traceback.format_exc(limit=-8)}
    rec.update(vllm_version=str(getattr(vllm, "__version__", "unknown")),
               vllm_import_s=round(time.perf_counter() - t0, 2))
    rec["standin"] = rec["vllm_version"].endswith(STANDIN_SUFFIX)
    if not rec["cuda_available"] and not rec["standin"]:
        return {"skipped": f"vllm {rec['vllm_version']} needs a CUDA device; none is visible",
                "vllm_version": rec["vllm_version"]}
    try:
        from r4b.models import build_model
        from r4b.rollout import EmbeddedEngine, SamplingParams
        from r4b.rollout.vllm_engine import VLLMEngine
        from r4b.runtime import init_runtime

        rt = init_runtime(1)
        dtype = "bfloat16" if rt.device.type == "cuda" else "float32"
        cfg = rollout_model_config(dtype)
        torch.manual_seed(0)
        model = build_model(cfg, device=rt.device).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # weights of 2 / sqrt(fan-in): peaked, varied, image-dependent tokens
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    w = torch.randn(p.shape, generator=g) * 2.0 * p[0].numel() ** -0.5
                elif name.endswith("weight"):  # norms
                    w = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
                else:
                    continue
                p.copy_(w)
        rec.update(device=str(rt.device), dtype=dtype, architecture=None,
                   model={"vocab_size": cfg.lm.vocab_size, "hidden_size": cfg.lm.hidden_size,
                          "num_layers": cfg.lm.num_layers, "head_dim": cfg.lm.head_dim,
                          "vision_hidden_size": cfg.vision.hidden_size,
                          "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size},
                   logprob_tol=VLLM_LOGPROB_TOL[dtype], image_hw=list(VLLM_ROLLOUT_IMAGE))
        work.mkdir(parents=True, exist_ok=True)
        proc_dir = write_rollout_processor(work / "processor", cfg)
        reqs = rollout_requests(cfg)
        n = VLLM_ROLLOUT_NEW_TOKENS
        params = SamplingParams(greedy=True, temperature=1.0, max_new_tokens_think=n,
                                max_new_tokens_no_think=n, max_new_tokens_auto=n)
        rec["sampling"] = dataclasses.asdict(params)
        kw = dict(stop_ids=[_TOK_IM_END], max_seqlen=512, banned_ids=[_TOK_IMAGE])
        embedded = EmbeddedEngine(model, **kw)
        t = time.perf_counter()
        want = embedded.generate(reqs, params)
        rec["embedded_generate_s"] = round(time.perf_counter() - t, 3)
        rec["embedded"] = [_rollout_fields(r) for r in want]
        engine_dir = work / "engine"
        if engine_dir.exists():
            shutil.rmtree(engine_dir)
        t = time.perf_counter()
        eng = VLLMEngine(model, **kw, tokenizer_dir=proc_dir, work_dir=engine_dir,
                         gpu_memory_utilization=0.3, enforce_eager=True)
        rec.update(vllm_init_s=round(time.perf_counter() - t, 2), architecture=eng.arch)
        try:  # what vLLM's image processor makes of the image (informative: not a pass mark)
            rec.update(_processor_pixels(engine_dir, reqs[0].images[0], cfg))
        except Exception as e:  # noqa: BLE001 - recorded; the rollout still runs
            rec["processor_error"] = f"{type(e).__name__}: {e}"
        t = time.perf_counter()
        got = eng.generate(reqs, params)
        rec["vllm_generate_s"] = round(time.perf_counter() - t, 3)
        rec.pop("embedded")
        rec["requests"] = compare_rollouts(reqs, got, want)
        diffs = [q["logprob_max_abs_diff"] for q in rec["requests"]
                 if q["logprob_max_abs_diff"] is not None]
        rec["logprob_max_abs_diff"] = max(diffs) if diffs else None
        rec["tokens_equal"] = all(q["tokens_equal"] for q in rec["requests"])
        rec["ok"] = rec["tokens_equal"] and all(d <= rec["logprob_tol"] for d in diffs)
        eng.shutdown()
    except Exception as e:  # noqa: BLE001 - recorded with what ran before it
        rec["error"] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=-8))
        rec["ok"] = False
    rec["wall_s_inside"] = round(time.perf_counter() - t0, 2)
    return rec


def vllm_rollout_main(argv) -> int:
    """``device_check.py vllm-rollout``: run :func:`vllm_rollout` and print its record."""
    ap = argparse.ArgumentParser(prog="device_check.py vllm-rollout",
                                 description="The device check's vLLM rollout phase, in its own "
                                             "process: prints one DEVICE_CHECK_JSON= line.")
    ap.add_argument("--work-dir", required=True, help="folder for the processor and engine files")
    ap.add_argument("--cpu", action="store_true",
                    help="run without CUDA (only r4b's vLLM stand-in runs there: the dry run)")
    a = ap.parse_args(argv)
    rec = vllm_rollout(Path(a.work_dir).resolve(), cpu=a.cpu)
    print("DEVICE_CHECK_JSON=" + json.dumps(rec, default=str), flush=True)
    return 0 if rec.get("ok") or rec.get("skipped") else 1


# ---------------------------------------------------------------- fetch (machine with network)
def manylinux_platforms(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a machine with this glibc accepts (pip does not expand them)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    plats = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
    return plats + [f"{n}_{arch}" for v, n in legacy.items() if (major, minor) >= v]


def closure_without(items: list[dict], reqs: list[str], cut: set) -> tuple[dict, dict]:
    """From the ``install`` items of pip's resolution report: ``{name: version}`` of all that
    ``reqs`` need without passing through a name in ``cut`` (what only torch and triton need
    stays out), and the whole resolution ``{name: (version, requires_dist)}``."""
    pk = _packaging()
    env = _marker_env(pk, None)  # pip evaluated the markers against this interpreter too
    graph = {}
    for it in items:
        md = it["metadata"]
        graph[canonical(md["name"])] = (md["version"], md.get("requires_dist") or [])
    keep, todo, walked = {}, [pk.Requirement(r) for r in reqs], set()
    while todo:
        req = todo.pop()
        n = canonical(req.name)
        if n in cut or n not in graph or (n, frozenset(req.extras)) in walked:
            continue
        walked.add((n, frozenset(req.extras)))
        keep[n] = graph[n][0]
        todo += [s for s in map(pk.Requirement, graph[n][1])
                 if _applies(s, env, set(req.extras) or {""})]
    return keep, graph


def fetch_main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="device_check.py fetch",
        description="Download the device check's wheels for the GPU machine's Python (needs "
                    "network). torch, triton and what only they need are left out.")
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    ap.add_argument("--dest", default=str(REPO / "wheels"), help="the wheel folder to fill")
    ap.add_argument("--python-version", default=here,
                    help="the GPU machine's Python, e.g. 3.12 (default: this one)")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64",
                    help="manylinux_<glibc>_<arch> of the GPU machine; older manylinux tags "
                         "are accepted too (default manylinux_2_28_x86_64)")
    ap.add_argument("--exclude", action="append", default=[],
                    help="leave this distribution out (the GPU machine has it); repeatable")
    ap.add_argument("--print-only", action="store_true", help="print the pip commands only")
    a = ap.parse_args(argv)
    m = re.match(r"manylinux_(\d+)_(\d+)_(\w+)$", a.platform)
    plats = manylinux_platforms(f"{m.group(1)}.{m.group(2)}", m.group(3)) if m else [a.platform]
    if a.python_version != here:
        say(f"note: pip evaluates environment markers with this Python ({here}); the folder is "
            f"checked against Python {a.python_version}'s markers after the download")
    dest = Path(a.dest).resolve()
    reqs = required_set(REPO)
    target = ["--only-binary=:all:", "--python-version", a.python_version, "--implementation", "cp"]
    for p in plats:
        target += ["--platform", p]
    with tempfile.TemporaryDirectory(prefix="r4b-fetch-") as tmp:
        report = Path(tmp) / "resolve.json"
        # --target only because older pips allow the platform options with it alone; with
        # --dry-run nothing is installed and only metadata is downloaded.
        resolve = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                   "--quiet", "--report", str(report), "--target", str(Path(tmp) / "t"),
                   "--find-links", str(dest), *target, *reqs]
        say("resolving the dependency closure:")
        say("  $ " + shlex.join(resolve))
        if a.print_only:
            say("  $ " + shlex.join([sys.executable, "-m", "pip", "download", "--no-deps",
                                     "--find-links", str(dest), "-d", str(dest), *target]) +
                " <every resolved name==version but torch, triton and what only they need>")
            return 0
        dest.mkdir(parents=True, exist_ok=True)
        if subprocess.run(resolve).returncode != 0:
            say("resolution failed. A dependency without a wheel for this target shows as 'No "
                "matching distribution found for X': build its wheel with the target Python "
                f"(pip wheel --no-deps X==<version> -w {dest}) and run fetch again")
            return 1
        items = json.loads(report.read_text())["install"]
    pk = _packaging()
    cut = set(MACHINE_PROVIDED) | {canonical(x) for x in a.exclude}
    keep, graph = closure_without(items, reqs, cut)
    left_out = sorted(set(graph) - set(keep))
    say(f"{len(keep)} wheels; left out (the machine provides them): {', '.join(left_out)}")
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--find-links", str(dest),
                "-d", str(dest), *target]
    pins = [f"{n}=={v}" for n, v in sorted(keep.items())]
    fetched = set(keep)
    for _ in range(4):  # then what the target's own markers add (python_version < "3.11": tomli)
        say("  $ " + shlex.join(download + pins))
        if subprocess.run(download + pins).returncode != 0:
            return 1
        chk = check_wheels(dest, reqs, all_wheels=True, target_python=a.python_version)
        pins = [e["requirement"] for e in chk["entries"]
                if e["status"] == "missing" and e["name"] not in cut]
        if not pins:
            break
        fetched |= {req_name(r) for r in pins}
        say(f"Python {a.python_version}'s markers also need: {', '.join(pins)}")

    def pinned(f):  # a resolved name: only the resolved version (an older fetch may be there)
        return f["name"] not in keep or pk.Version(f["version"]) == pk.Version(keep[f["name"]])

    fetched |= {e["name"] for e in chk["entries"] if e.get("source") == "wheel"}
    wheels = [f for f in scan_folder(dest, pk)
              if f["kind"] == "wheel" and f["name"] in fetched and pinned(f)]
    left = [e["problem"] for e in chk["entries"] if "problem" in e]
    for p in left:
        say(f"  ! {p}")
    manifest = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "python_version": a.python_version, "platforms": plats, "requirements": reqs,
                "left_out": left_out,
                "wheels": [{k: f[k] for k in ("name", "version", "file")} for f in wheels]}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum((dest / f["file"]).stat().st_size for f in wheels) / 2**20
    say(f"wrote {dest / 'manifest.json'}: {len(wheels)} wheels, {size:.0f} MiB")
    return 1 if left else 0


# ---------------------------------------------------------------- entry point
def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="device_check.py",
        description="Install from carried wheels, build the extension, run the GPU tests, the "
                    "gated benchmarks and a 20-step main job, and write one JSON of results. "
                    "`device_check.py fetch --help`: download the wheels (machine with network).")
    ap.add_argument("--wheels", default=str(REPO / "wheels"), help="folder of carried wheels")
    ap.add_argument("--out", default=None,
                    help="folder for the results JSON (default benchmarks/results/; with "
                         "--dry-run the work directory)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: check the folder, print the pip commands, collect the tests, run "
                         "the main job for one tiny step")
    ap.add_argument("--dry-run-main", choices=("run", "parse"), default="run",
                    help="with --dry-run: run the tiny main job (about 30 s) or only validate "
                         "its GPU arguments")
    ap.add_argument("--work-dir", default=None,
                    help="logs, JUnit files and the main job's run (default: a new temporary "
                         "folder)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"stop the whole check after this many seconds (default {BUDGET_S})")
    ap.add_argument("--timeout", action="append", metavar="PHASE=S",
                    help="change one phase's timeout; repeatable")
    ap.add_argument("--only", default=None, help="comma-separated phases to run")
    ap.add_argument("--skip", default=None, help="comma-separated phases to skip")
    ap.add_argument("--all-wheels", action=argparse.BooleanOptionalAction, default=None,
                    help="require a wheel for every dependency even when it is installed "
                         "(default: on with --dry-run, which checks a folder for a bare machine)")
    ap.add_argument("--target-python", default=None,
                    help="check the wheels for this Python (e.g. 3.12) instead of the running "
                         "one; skips pip's offline resolution")
    ap.add_argument("--pip-arg", action="append", default=None,
                    help="extra argument for the pip installs (e.g. --pip-arg=--user); repeatable")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream every command's output")
    return ap.parse_args(argv)


def _on_sigterm(*_):
    raise KeyboardInterrupt  # the running phase's process group is killed, the JSON written


def main(argv=None) -> int:
    if sys.version_info < (3, 10):
        say(f"Python {platform.python_version()} is too old: r4b needs Python >= 3.10")
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch"]:
        return fetch_main(argv[1:])
    if argv[:1] == ["vllm-rollout"]:
        return vllm_rollout_main(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
