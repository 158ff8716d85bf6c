"""Can torch use this machine's NVIDIA GPUs? The facts (the driver's version, each GPU's compute
capability, torch's CUDA version and kernel architectures) and one decision on them: None, or
the one line that refuses to go on and says how to fix it. Without it, torch just reports no
CUDA when the driver is older than its CUDA needs, or runs a GPU it has no kernels for until
the first kernel fails, and `train.device: auto` quietly trains on the CPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

DRIVER_FILE = Path("/proc/driver/nvidia/version")
SMI_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
# The oldest driver (major version) each CUDA major version runs on: minor-version
# compatibility (NVIDIA's CUDA compatibility guide). A newer CUDA than the driver: no device.
MIN_DRIVER = {12: 525, 13: 580}
LEGACY_INDEX = "https://download.pytorch.org/whl/cu126"  # PyTorch's CUDA 12.x build
CUDA13_INDEX = "https://download.pytorch.org/whl/cu130"  # what constraints.txt installs
# The kernels of PyTorch's CUDA 12.6 builds (its support matrix for 2.11 to 2.14): the only
# builds with Maxwell, Pascal and Volta (V100); CUDA 13 supports none of them.
CU126_ARCHES = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU130_ARCHES = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # torch 2.14.1's


class GpuUnusable(OSError):
    """This machine's GPUs are there but torch cannot use them. An OSError (EnvironmentError:
    the machine, not the input) so every command's error path prints it as one line."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_cap: str  # "7.0"; nvidia-smi says "[N/A]" where it cannot tell
    driver: str


@dataclass(frozen=True)
class TorchSide:
    version: str  # torch.__version__ without its local label: "2.14.1"
    cuda: str | None  # torch.version.cuda: "13.0"; None for a CPU-only build
    arches: tuple[str, ...]  # kernels built in: ("sm_75", "sm_80", ...)
    devices: int  # CUDA devices torch sees (0 when the driver is too old)
    torchvision: str | None = None  # its version without the local label, when installed


@dataclass(frozen=True)
class GpuFacts:
    driver: str | None  # from /proc/driver/nvidia/version; None: no NVIDIA kernel module
    gpus: tuple[Gpu, ...] | None  # from nvidia-smi; None: nvidia-smi missing or failed
    torch: TorchSide
    visible: str | None = None  # CUDA_VISIBLE_DEVICES as set, None when unset
    device_files: int = 0  # /dev/nvidia0, /dev/nvidia1, ...: the GPUs this process may open


def read_driver_version(path: Path = DRIVER_FILE) -> str | None:
    """'535.129.03' from the kernel module's version file; None where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:  # no NVIDIA kernel module loaded (or a container that hides it)
        return None
    found = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return found.group(1) if found else None


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """The GPUs of `nvidia-smi --query-gpu=name,compute_cap,driver_version
    --format=csv,noheader`: one 'NAME, 7.0, 535.129.03' line each."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.rsplit(",", 2)]  # the name last may hold commas
        if len(parts) == 3 and parts[0]:
            gpus.append(Gpu(*parts))
    return tuple(gpus)


def query_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run
               ) -> tuple[Gpu, ...] | None:
    """nvidia-smi's GPU list; None where nvidia-smi is missing or fails (an old one does not
    know compute_cap). Its "No devices were found" (no GPU given to this job) is ()."""
    if shutil.which(SMI_QUERY[0]) is None:
        return None
    try:
        done = run(SMI_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if "No devices were found" in (done.stdout or "") + (done.stderr or ""):
        return ()
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else None


def torch_side() -> TorchSide:
    """What the installed torch was built for and what it sees."""
    import torch

    arches: tuple[str, ...] = ()
    if torch.version.cuda is not None:
        # _cuda_getArchFlags is the build's own list; get_arch_list() is empty without a device
        # on some versions, and the arch list matters most exactly then.
        flags = getattr(torch._C, "_cuda_getArchFlags", None)
        arches = tuple((flags() if flags else " ".join(torch.cuda.get_arch_list())).split())
    try:
        from importlib.metadata import PackageNotFoundError, version
        torchvision = version("torchvision").split("+")[0]
    except PackageNotFoundError:
        torchvision = None
    return TorchSide(torch.__version__.split("+")[0], torch.version.cuda, arches,
                     torch.cuda.device_count() if torch.version.cuda else 0, torchvision)


def probe(driver_file: Path = DRIVER_FILE, gpus: Callable[[], tuple[Gpu, ...] | None] = query_gpus,
          torch: Callable[[], TorchSide] = torch_side, dev: Path = Path("/dev")) -> GpuFacts:
    """This machine's facts; the readers are parameters so tests give them fixtures."""
    return GpuFacts(read_driver_version(driver_file), gpus(), torch(),
                    os.environ.get("CUDA_VISIBLE_DEVICES"), len(list(dev.glob("nvidia[0-9]*"))))


def _major(version: str | None) -> int | None:
    found = re.match(r"\d+", version or "")
    return int(found.group()) if found else None


def _sm(compute_cap: str) -> str | None:
    found = re.fullmatch(r"(\d+)\.(\d+)", compute_cap.strip())
    return f"sm_{found.group(1)}{found.group(2)}" if found else None


def has_kernels(compute_cap: str, arches: tuple[str, ...]) -> bool:
    """True when a kernel in `arches` runs on a GPU of this compute capability: a cubin of the
    same major version and a minor version not above it (sm_80 runs on 8.6), or PTX of a
    capability not above it (compute_120 is compiled for newer GPUs by the driver)."""
    found = re.fullmatch(r"(\d+)\.(\d+)", compute_cap.strip())
    if not found:
        return True  # nvidia-smi could not tell: nothing to refuse on
    major, minor = int(found.group(1)), int(found.group(2))
    for arch in arches:
        kind = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if not kind:
            continue
        a_major, a_minor, suffix = int(kind.group(2)), int(kind.group(3)), kind.group(4)
        if suffix:  # sm_90a and the like run on that exact capability only
            if (a_major, a_minor) == (major, minor):
                return True
        elif kind.group(1) == "sm" and a_major == major and a_minor <= minor:
            return True
        elif kind.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _hidden(visible: str | None) -> bool:
    """CUDA_VISIBLE_DEVICES set to hide every GPU: a CPU run chosen on purpose."""
    return visible is not None and (visible.strip() == "" or visible.strip().startswith("-1"))


def install_line(side: TorchSide, index: str = LEGACY_INDEX, python: str | None = None) -> str:
    """The pip line that replaces torch (and torchvision) by the same versions built for the
    CUDA of `index` (cu126: its local version label)."""
    label = index.rstrip("/").rsplit("/", 1)[-1]
    packages = [f"torch=={side.version}+{label}"]
    if side.torchvision:
        packages.append(f"torchvision=={side.torchvision}+{label}")
    return f"{python or sys.executable} -m pip install {' '.join(packages)} --index-url {index}"


def refusal(facts: GpuFacts, python: str | None = None) -> str | None:
    """None where torch can use this machine's NVIDIA GPUs, or where it has none (or they are
    hidden by CUDA_VISIBLE_DEVICES); else one line naming the driver, torch's CUDA and kernel
    architectures, what is wrong and the fix."""
    if _hidden(facts.visible) or facts.gpus == ():
        return None
    if facts.gpus is None and (facts.driver is None or not facts.device_files):
        # Without nvidia-smi: no driver, or a driver but no GPU device given to this process
        # (a container on a GPU host sees the host's /proc/driver/nvidia).
        return None
    side, gpus = facts.torch, facts.gpus or ()
    missing = sorted({_sm(gpu.compute_cap) or gpu.compute_cap for gpu in gpus
                      if side.cuda is not None and not has_kernels(gpu.compute_cap, side.arches)})
    if side.cuda is not None and side.devices > 0 and not missing:
        return None
    driver = facts.driver or next((gpu.driver for gpu in gpus), None)
    driver_major, cuda_major = _major(driver), _major(side.cuda)
    old_driver = (driver_major is not None and cuda_major in MIN_DRIVER
                  and driver_major < MIN_DRIVER[cuda_major])
    counts = Counter(f"{gpu.name} ({_sm(gpu.compute_cap) or gpu.compute_cap})" for gpu in gpus)
    names = ", ".join(name if n == 1 else f"{n} x {name}" for name, n in counts.items())
    built = (f"torch {side.version} is a CPU-only build" if side.cuda is None else
             f"torch {side.version} is built for CUDA {side.cuda} with kernels for "
             f"{' '.join(side.arches) or 'no architecture'}")
    why = []
    if old_driver:
        why.append(f"CUDA {side.cuda} needs driver >= {MIN_DRIVER[cuda_major]}")
    if missing:
        why.append(f"no kernels for {' '.join(missing)}")
    if side.cuda is not None and side.devices == 0 and not why:
        why.append("it sees no CUDA device")
    return (f"torch cannot use this machine's NVIDIA GPU {names or '(nvidia-smi not found)'}"
            f" with driver {driver or 'unknown'}: {built}"
            + (f"; {'; '.join(why)}" if why else "")
            + f"; fix: {_fix(side, gpus, driver_major, old_driver, missing, python)}"
            "; train.device=cpu trains on the CPU on purpose")


def _fix(side: TorchSide, gpus: tuple[Gpu, ...], driver_major: int | None, old_driver: bool,
         missing: list[str], python: str | None) -> str:
    def fits(arches: tuple[str, ...]) -> bool:
        return all(has_kernels(gpu.compute_cap, arches) for gpu in gpus)

    new_driver = driver_major is None or driver_major >= MIN_DRIVER[13]
    if side.cuda is None and new_driver and fits(CU130_ARCHES):
        return ("install a torch build for CUDA 13.0: "
                + install_line(side, index=CUDA13_INDEX, python=python))
    steps = []
    oldest = MIN_DRIVER[12 if fits(CU126_ARCHES) else 13]  # the CUDA these GPUs can run
    if driver_major is not None and driver_major < oldest:
        steps.append(f"update the NVIDIA driver to >= {oldest}")
    # A CUDA 12.x torch on a too old driver needs only the driver; the rest a CUDA 12.6 build.
    needs_build = side.cuda is None or bool(missing) or (old_driver and _major(side.cuda) != 12)
    if needs_build and fits(CU126_ARCHES):
        line = f"install a torch build for CUDA 12.x: {install_line(side, python=python)}"
        if missing:
            line += (f" (PyTorch lists {' '.join(CU126_ARCHES)} for its CUDA 12.6 builds of "
                     f"2.14; check that torch.cuda.get_arch_list() includes {' '.join(missing)})")
        elif old_driver and not steps:
            line += f", or update the NVIDIA driver to >= {MIN_DRIVER[13]}"
        steps.append(line)
    elif missing:
        steps.append(f"install a torch build whose torch.cuda.get_arch_list() includes "
                     f"{' '.join(missing)}")
    if not steps:
        steps.append("check that nvidia-smi lists the GPU and that this process may open "
                     "/dev/nvidia*")
    return ", then ".join(steps)


T = TypeVar("T")


def refuse_unusable_gpu(device: T = None, facts: GpuFacts | None = None) -> T:
    """`device` itself, once this machine's NVIDIA GPUs are known usable by torch (or absent);
    GpuUnusable with the one-line reason otherwise."""
    why = refusal(facts if facts is not None else probe())
    if why:
        raise GpuUnusable(why)
    return device
