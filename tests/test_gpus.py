"""A GPU that torch cannot use is refused with one line, never trained on the CPU unasked: the
readers on fixture files (a driver's /proc version file, nvidia-smi's CSV), the decision on
their facts, pick_device, and what `powergrad train` and `powergrad gpu-check` print."""
import re
from pathlib import Path

import pytest
import torch

from powergrad.commands import cli, gpu_check
from powergrad.system import gpus
from powergrad.system.gpus import GpuUnusable, TorchSide
from powergrad.training.builders import pick_device

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gpus"
# torch 2.14.1's default wheel, the one constraints.txt installs (REFERENCE.md section 6)
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def pinned(package: str) -> str:
    """The version constraints.txt pins for `package`."""
    text = (REPO / "constraints.txt").read_text()
    return re.search(rf"^{package}==(\S+)$", text, re.MULTILINE).group(1)


def torch_cu130(devices: int) -> TorchSide:
    return TorchSide(pinned("torch"), "13.0", CU130, devices, pinned("torchvision"))


def smi(name: str):
    return lambda: gpus.parse_nvidia_smi((FIXTURES / name).read_text())


def facts(driver: str, smi_file: str, devices: int) -> gpus.GpuFacts:
    return gpus.probe(FIXTURES / driver, smi(smi_file), lambda: torch_cu130(devices))


@pytest.fixture(autouse=True)
def all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def fix_line() -> str:
    return (f"-m pip install torch=={pinned('torch')}+cu126 "
            f"torchvision=={pinned('torchvision')}+cu126 "
            "--index-url https://download.pytorch.org/whl/cu126")


# --- the readers ----------------------------------------------------------------------------

def test_driver_version_from_both_kernel_modules_and_none_without_one(tmp_path):
    assert gpus.read_driver_version(FIXTURES / "driver_535.txt") == "535.129.03"
    assert gpus.read_driver_version(FIXTURES / "driver_580_open.txt") == "580.82.07"
    assert gpus.read_driver_version(tmp_path / "absent") is None
    (tmp_path / "odd").write_text("something else\n")
    assert gpus.read_driver_version(tmp_path / "odd") is None


def test_nvidia_smi_lines_parse_to_gpus():
    found = gpus.parse_nvidia_smi((FIXTURES / "smi_v100_580.txt").read_text() + "\n")
    assert found == (gpus.Gpu("Tesla V100-SXM2-32GB", "7.0", "580.82.07"),) * 2


def fake_smi(folder: Path, stdout: str, code: int) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "{stdout}"\nexit {code}\n')  # builtins: PATH is bare
    script.chmod(0o755)


def test_nvidia_smi_missing_failing_or_without_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus.query_gpus() is None  # no binary: nothing known, no error
    fake_smi(tmp_path, (FIXTURES / "smi_h100_580.txt").read_text().strip(), 0)
    assert gpus.query_gpus() == (gpus.Gpu("NVIDIA H100 80GB HBM3", "9.0", "580.82.07"),)
    fake_smi(tmp_path, "NVIDIA-SMI has failed because it couldn't communicate with the "
             "NVIDIA driver.", 9)
    assert gpus.query_gpus() is None
    fake_smi(tmp_path, "No devices were found", 6)
    assert gpus.query_gpus() == ()  # a job given no GPU


def test_has_kernels_follows_cubin_and_ptx_rules():
    assert gpus.has_kernels("8.9", CU130)  # sm_86's cubin runs on 8.9 (L4, L40)
    assert not gpus.has_kernels("7.0", CU130)
    assert not gpus.has_kernels("12.0", ("sm_100",))  # another major version
    assert gpus.has_kernels("12.1", ("compute_120",))  # PTX compiles forward
    assert gpus.has_kernels("9.0", ("sm_90a",))
    assert not gpus.has_kernels("9.1", ("sm_90a",))  # arch-specific: that capability only


def test_the_readme_gives_the_line_the_refusal_prints():
    line = gpus.install_line(torch_cu130(0), python="python")
    assert line.endswith(fix_line())
    assert f"\n{line}\n" in (REPO / "README.md").read_text()


# --- the decision ---------------------------------------------------------------------------

def test_an_old_driver_is_refused_naming_it_the_cuda_and_the_fix():
    why = gpus.refusal(facts("driver_535.txt", "smi_a100_535.txt", devices=0))
    assert why is not None and "\n" not in why
    assert "2 x NVIDIA A100-SXM4-80GB (sm_80) with driver 535.129.03" in why
    assert "CUDA 13.0 needs driver >= 580" in why
    assert " ".join(CU130) in why
    assert fix_line() in why  # the CUDA 12.x build of the constrained versions
    assert "train.device=cpu" in why


def test_a_v100_with_a_new_driver_is_refused_naming_sm_70():
    why = gpus.refusal(facts("driver_580_open.txt", "smi_v100_580.txt", devices=2))
    assert why is not None and "\n" not in why
    assert "2 x Tesla V100-SXM2-32GB (sm_70)" in why and "no kernels for sm_70" in why
    assert "needs driver" not in why  # 580 is new enough: the kernels are what is missing
    assert fix_line() in why and "get_arch_list() includes sm_70" in why


def test_a_v100_on_an_old_driver_needs_the_cuda_12_build_not_a_new_driver():
    old = gpus.GpuFacts("535.129.03", (gpus.Gpu("Tesla V100-PCIE-16GB", "7.0", "535.129.03"),),
                        torch_cu130(0))
    why = gpus.refusal(old)
    assert "needs driver >= 580" in why and "no kernels for sm_70" in why and fix_line() in why
    assert "update the NVIDIA driver to >= 580" not in why  # 580 would not give it kernels


def test_a_cuda_12_build_needs_sm_70_or_only_a_newer_driver():
    v100 = (gpus.Gpu("Tesla V100-PCIE-16GB", "7.0", "560.35.03"),)
    cu128 = TorchSide(pinned("torch"), "12.8", CU130, 1, pinned("torchvision"))
    assert fix_line() in gpus.refusal(gpus.GpuFacts("560.35.03", v100, cu128))
    a100 = (gpus.Gpu("NVIDIA A100-SXM4-80GB", "8.0", "515.105.01"),)
    cu126 = TorchSide(pinned("torch"), "12.6", gpus.CU126_ARCHES, 0, pinned("torchvision"))
    why = gpus.refusal(gpus.GpuFacts("515.105.01", a100, cu126))
    assert "CUDA 12.6 needs driver >= 525" in why
    assert "fix: update the NVIDIA driver to >= 525;" in why  # the build is already right


def test_a_machine_without_nvidia_gpus_is_fine(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    found = gpus.probe(tmp_path / "no_driver_file", dev=tmp_path)  # this torch, as installed
    assert found.driver is None and found.gpus is None
    assert gpus.refusal(found) is None
    gpus.refuse_unusable_gpu(facts=found)  # no error


def test_a_driver_without_device_files_or_gpus_for_this_job_is_fine(tmp_path):
    host_only = gpus.probe(FIXTURES / "driver_535.txt", lambda: None, lambda: torch_cu130(0),
                           dev=tmp_path)  # a container on a GPU host, given no GPU
    assert gpus.refusal(host_only) is None
    (tmp_path / "nvidia0").touch()
    given_one = gpus.probe(FIXTURES / "driver_535.txt", lambda: None, lambda: torch_cu130(0),
                           dev=tmp_path)
    assert "driver 535.129.03" in gpus.refusal(given_one)  # nvidia-smi missing, GPU there
    assert gpus.refusal(gpus.probe(FIXTURES / "driver_535.txt", lambda: (),
                                   lambda: torch_cu130(0))) is None  # "No devices were found"


def test_gpus_hidden_on_purpose_are_fine(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.refusal(facts("driver_535.txt", "smi_a100_535.txt", devices=0)) is None


def test_a_usable_gpu_is_fine():
    assert gpus.refusal(facts("driver_580_open.txt", "smi_h100_580.txt", devices=1)) is None


def test_a_cpu_only_torch_beside_a_gpu_is_refused_with_the_build_its_driver_takes():
    side = TorchSide(pinned("torch"), None, (), 0, pinned("torchvision"))
    new = gpus.refusal(gpus.probe(FIXTURES / "driver_580_open.txt", smi("smi_h100_580.txt"),
                                  lambda: side))
    assert "CPU-only build" in new and "no kernels" not in new
    assert (f"torch=={pinned('torch')}+cu130 torchvision=={pinned('torchvision')}+cu130 "
            "--index-url https://download.pytorch.org/whl/cu130") in new
    old = gpus.refusal(gpus.probe(FIXTURES / "driver_535.txt", smi("smi_a100_535.txt"),
                                  lambda: side))
    assert "CPU-only build" in old and fix_line() in old


# --- where the user meets it ----------------------------------------------------------------

@pytest.fixture
def old_driver_machine(monkeypatch):
    """This process sees the old-driver machine: its facts, and torch without CUDA."""
    found = facts("driver_535.txt", "smi_a100_535.txt", devices=0)
    monkeypatch.setattr(gpus, "probe", lambda: found)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_pick_device_refuses_auto_and_cuda_instead_of_the_cpu(old_driver_machine):
    for name in ("auto", "cuda"):
        with pytest.raises(GpuUnusable, match="driver 535.129.03") as caught:
            pick_device(name)
        assert "\n" not in str(caught.value)


def test_pick_device_cpu_never_probes(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("train.device: cpu probed the GPUs")
    monkeypatch.setattr(gpus, "probe", no_probe)
    monkeypatch.setattr(gpus, "refusal", no_probe)
    assert pick_device("cpu") == torch.device("cpu")


def test_gpu_check_refuses_with_one_line_and_a_nonzero_exit(old_driver_machine, monkeypatch,
                                                            capsys):
    def cpu_form(*args, **kwargs):
        raise AssertionError("gpu-check ran its CPU form")
    monkeypatch.setattr(gpu_check, "Context", cpu_form)
    assert cli.main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("powergrad gpu-check: torch cannot use") and "\n" not in err
    assert "535.129.03" in err and "Traceback" not in err


def test_train_refuses_with_one_line(old_driver_machine, tmp_path, capsys):
    recipe = REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
    code = cli.main(["train", str(recipe), "--fast-dev-run", "1", "train.threads=1",
                     "data.train_subset=64", "data.eval_subset=64", "train.batch_size=32",
                     f"log.output={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # refused by the recipe checks, before the run folder is locked
    assert err.startswith("recipe error: ") and "\n" not in err
    assert "train.device: got 'auto': torch cannot use" in err
    assert "535.129.03" in err and "CUDA 13.0" in err
