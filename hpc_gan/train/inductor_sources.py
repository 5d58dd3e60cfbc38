"""What torch.compile's kernels are: the source inductor generated for a kernel a profile names.

A compiled step's profile names inductor's fused kernels by their ops ("triton_red_fused_mul_sum_19": 5.9 ms in one
call of the H200's 319 ms step at 256 per GPU, 2026-11-27), which does not say which layer, over how many elements,
or in which memory order they are read. Inductor's output code says all three: each kernel is defined as
``NAME = async_compile.triton('NAME', '''source''')`` (``cpp_pybinding`` on a CPU) after comments that name the
graph nodes and aten ops it fuses; the source states its sizes (``xnumel = ...``, ``r0_numel = ...``) and the index
expressions of its loads. This reads the output code this process loaded, so a GPU run reports them for its slowest
kernels, in its own JSON, with nothing to fetch afterwards.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_DEFINITION = re.compile(r"^(\w+) = async_compile\.\w+\(", re.M)
_SOURCE = re.compile(r"r?'''(.*?)'''", re.S)  # the first triple-quoted string after the definition
_SIZES = re.compile(r"^\s*(\w*numel) = (\d+)\s*$", re.M)
_ATEN = re.compile(r"Original ATen: \[([^\]]*)\]")
_HINTS = re.compile(r"(size_hints=(?:\{[^}]*\}|\[[^\]]*\])|reduction_hint=ReductionHint\.\w+)")
_PREAMBLE = re.compile(r"^(import |from |triton_helpers\.set_driver).*\n", re.M)  # the same in every kernel


def loaded_output_code() -> List[Path]:
    """The output-code files of the graphs this process compiled or loaded from inductor's cache (torch's
    PyCodeCache: the files are in the cache directory, written or reused)."""
    from torch._inductor.codecache import PyCodeCache
    files = [getattr(m, "__file__", None) for m in list(PyCodeCache.modules)]
    return list(dict.fromkeys(Path(f) for f in files if f and Path(f).exists()))


def kernel_definitions(text: str) -> Dict[str, Dict[str, object]]:
    """The kernels one output-code file defines, by name: the comment lines just above the definition (graph
    nodes, aten ops), the aten ops alone (``aten``), the sizes its source states, and the source."""
    found: Dict[str, Dict[str, object]] = {}
    for match in _DEFINITION.finditer(text):
        source = _SOURCE.search(text, match.end())
        if source is None:
            continue
        origin = _comments_above(text, match.start())
        aten = _ATEN.search(origin)
        found[match.group(1)] = {
            "origin": origin, "aten": aten.group(1) if aten else "",
            "sizes": {k: int(v) for k, v in _SIZES.findall(source.group(1))},
            "hints": [h.replace(" ", "") for h in _HINTS.findall(source.group(1))],
            "source": _PREAMBLE.sub("", source.group(1)).strip("\n")}
    return found


def _comments_above(text: str, start: int) -> str:
    """The run of comment lines that ends on the line before offset ``start`` (a line's start), walked back line by
    line: an output-code file defines hundreds of kernels."""
    lines: List[str] = []
    end = start - 1  # the newline that ends the line above
    while end > 0:
        begin = text.rfind("\n", 0, end) + 1
        if not text.startswith("#", begin):
            break
        lines.append(text[begin:end])
        end = begin - 1
    return "\n".join(reversed(lines))


def kernel_sources(names: Optional[Iterable[str]] = None, files: Optional[Iterable[Path]] = None,
                   max_chars: int = 3000) -> Dict[str, List[Dict[str, object]]]:
    """The definitions of the kernels ``names`` (None: every kernel) in ``files`` (default: this process's output
    code), each source cut to ``max_chars``. A list per name: each compiled graph numbers its kernels from 0, so
    two graphs can both define "triton_poi_fused_relu_4" (a profile adds their times under one name)."""
    wanted = None if names is None else set(names)
    out: Dict[str, List[Dict[str, object]]] = {}
    for path in (loaded_output_code() if files is None else files):
        for name, d in kernel_definitions(Path(path).read_text(errors="replace")).items():
            if wanted is None or name in wanted:
                out.setdefault(name, []).append({"file": Path(path).name, **d, "origin": str(d["origin"])[:max_chars],
                                                 "source": str(d["source"])[:max_chars]})
    return out


def describe(definition: Dict[str, object]) -> str:
    """One line for a report: a kernel definition's sizes, its autotuning hints (size_hints; reduction_hint: OUTER
    reduces across the contiguous dimension) and its aten ops."""
    sizes = ", ".join(f"{k} {v}" for k, v in dict(definition.get("sizes") or {}).items())
    hints = ", ".join(definition.get("hints") or [])
    aten = f"aten {definition['aten']}" if definition.get("aten") else ""
    return "; ".join(x for x in (sizes, hints, aten) if x) or "no sizes stated"
