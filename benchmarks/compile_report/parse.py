"""Parsers for the compile report: Triton's compile artefacts (TTIR, TTGIR, LLVM IR, PTX) and the `ptxas -v` log.

Pure text functions, no Triton import, so the unit tests can feed them small synthetic snippets. The facts they extract
are the ones a kernel change is judged by before any GPU run: registers and spills, how each `tl.dot` was lowered, and
how wide every global load is and which kernel argument it reads.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# ---------------------------------------------------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads and static smem of the (single) entry function in a `ptxas -v` log.
    Several functions (an entry and its callees) are folded with max (registers) and sum (bytes)."""
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _SPILL.findall(log)]
    smem = [int(m) for m in _SMEM.findall(log)]
    if not regs:
        raise ValueError("no 'Used N registers' line in the ptxas log")
    return dict(
        registers=max(regs),
        stack_bytes=sum(s[0] for s in spills),
        spill_store_bytes=sum(s[1] for s in spills),
        spill_load_bytes=sum(s[2] for s in spills),
        static_smem_bytes=max(smem) if smem else 0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Occupancy (the CUDA occupancy calculator's rules, per SM)
# ---------------------------------------------------------------------------------------------------------------------

# arch -> (registers per SM, max warps per SM, max blocks per SM, shared memory per SM, max per block, reserved/block)
SM_LIMITS = {
    90: (65536, 64, 32, 228 * 1024, 227 * 1024, 1024),
    80: (65536, 64, 32, 164 * 1024, 163 * 1024, 1024),
    100: (65536, 64, 32, 228 * 1024, 227 * 1024, 1024),  # B200 / GB200
    120: (65536, 48, 32, 100 * 1024, 99 * 1024, 1024),  # RTX 50xx: 48 warps and 99 KB per block
}


def occupancy(arch: int, registers: int, num_warps: int, smem_bytes: int) -> dict:
    """Resident blocks and warps per SM and what limits them: registers (allocated per warp in units of 256), shared
    memory (plus the 1 KB the driver reserves per block), or the warp / block caps."""
    regs_sm, warps_sm, blocks_sm, smem_sm, smem_block, reserved = SM_LIMITS[arch]
    if smem_bytes > smem_block:
        return dict(blocks_per_sm=0, warps_per_sm=0, limiter="smem>max")
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by = {
        "warps": warps_sm // num_warps,
        "blocks": blocks_sm,
        "registers": (regs_sm // regs_per_warp) // num_warps,
        "smem": smem_sm // (smem_bytes + reserved),
    }
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    blocks = by[limiter]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps, limiter=limiter)


# ---------------------------------------------------------------------------------------------------------------------
# TTIR / TTGIR
# ---------------------------------------------------------------------------------------------------------------------


def _balanced(text: str, start: int) -> str:
    """The text inside the parenthesis that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return text[start + 1:]


def _split_top(s: str) -> list[str]:
    """Split on commas outside (), <>, {}, [] and quotes."""
    out, depth, cur, quote = [], 0, [], False
    for c in s:
        if c == '"':
            quote = not quote
        elif not quote and c in "(<{[":
            depth += 1
        elif not quote and c in ")>}]":
            depth -= 1
        if c == "," and depth == 0 and not quote:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def ttir_arg_names(ttir: str) -> list[str]:
    """The kernel's runtime arguments in order (constexprs are not arguments of the compiled function), named by their
    `loc("NAME")` (Triton >= 3.x) or else by their SSA name."""
    m = re.search(r"tt\.func (?:public )?@[\w.$]+\(", ttir)
    if not m:
        raise ValueError("no tt.func in the TTIR")
    names = []
    for arg in _split_top(_balanced(ttir, m.end() - 1)):
        loc = re.search(r'loc\("([^"]+)"', arg)
        ssa = re.match(r"\s*%([\w.$-]+)", arg)
        names.append(loc.group(1) if loc else (ssa.group(1) if ssa else f"arg{len(names)}"))
    return names


_ALIAS = re.compile(r"^(#[\w.]+) = #(?:ttg|triton_gpu|ttng)\.(\w+)<(.*)$", re.M)


def ttgir_dots(ttgir: str) -> dict:
    """How each dot was lowered: `wgmma` (Hopper warp-group MMA), `mma_sync` (Ampere-style mma.sync), `tcgen05`,
    `fma` (no tensor cores: a blocked-layout dot)."""
    aliases = {a: (kind, body) for a, kind, body in _ALIAS.findall(ttgir)}
    counts = Counter()
    for line in ttgir.splitlines():
        if re.search(r"=\s*ttng\.warp_group_dot\b", line):
            counts["wgmma"] += 1
        elif re.search(r"\bttng\.tc_gen5_mma\b", line):
            counts["tcgen05"] += 1
        elif re.search(r"=\s*tt\.dot\b", line):
            enc = re.search(r"->\s*tensor<[^>]*?,\s*(#[\w.]+)>", line)
            kind, body = aliases.get(enc.group(1), ("?", "")) if enc else ("?", "")
            if kind == "nvidia_mma":
                major = re.search(r"versionMajor\s*=\s*(\d+)", body)
                counts["wgmma" if major and major.group(1) == "3" else "mma_sync"] += 1
            elif kind == "blocked":
                counts["fma"] += 1
            else:
                counts["other"] += 1
    return dict(counts)


def ttgir_dot_shapes(ttgir: str) -> list[list[int]]:
    """(M, N, K) of every dot in the TTGIR: A is M x K, the result M x N."""
    shapes = []
    for line in ttgir.splitlines():
        if not re.search(r"=\s*(?:ttng\.warp_group_dot|tt\.dot)\b", line):
            continue
        typed = line.split(" : ", 1)[-1]
        dims = re.findall(r"<(\d+)x(\d+)x", typed)
        if len(dims) >= 2:
            (m, k), (_, n) = dims[0], dims[-1]
            shapes.append([int(m), int(n), int(k)])
    return shapes


def head_dim_padding(shapes: list[list[int]], block_m: int, block_n: int, head_dim: int) -> float | None:
    """Tensor-core work done per useful head-dim lane: each dot's head-dim extent is what is left of (M, N, K) after
    removing one BLOCK_M and one BLOCK_N; the ratio is sum(extents) / (head_dim x number of dots at the largest extent),
    i.e. 128/72 for a head dim 72 padded to 128, 80/72 for a 64 + 16 split. None without dots."""
    ext = []
    for dims in shapes:
        rest = list(dims)
        for b in (block_m, block_n):
            if b in rest:
                rest.remove(b)
        ext.append(rest[0] if len(rest) == 1 else min(rest))
    if not ext:
        return None
    return round(sum(ext) / (head_dim * ext.count(max(ext))), 4)


def ttgir_features(ttgir: str) -> dict:
    """Pipelining and Hopper features visible in the TTGIR."""
    return dict(
        async_copies=len(re.findall(r"\bttg\.async_copy_global_to_local\b", ttgir)),
        tma_loads=len(re.findall(r"\bttng\.async_tma_copy_global_to_local\b|\btt\.descriptor_load\b|"
                                 r"\bttng\.async_tma_gather\b", ttgir)),
        warp_specialized=bool(re.search(r"\bttg\.warp_specialize\b", ttgir)),
    )


_PARTITION = re.compile(r"^\s*(default\s*\{|partition\d+\()")
_TILE_STORE = re.compile(r"\b(?:ttng\.async_tma_copy_local_to_global|tt\.descriptor_store)"
                         r"\s+(%[\w.]+)\s*\[\s*(%[\w.]+)")


def ws_shared_rows(ttgir: str) -> list[str]:
    """Warp-specialized partitions that compute the same rows: the tile stores (TMA / descriptor stores, keyed by
    descriptor and row coordinate) that two or more partitions of one `ttg.warp_specialize` issue. A kernel whose
    consumer warp groups split the tile stores each part once (row coordinates start_m and start_m + 64); one whose
    tile is too small to split has every consumer group compute and store the whole tile: all work done twice."""
    seen: dict[tuple, set] = {}
    part = None
    for line in ttgir.splitlines():
        if re.search(r"\bttg\.warp_specialize\b", line):
            part = None
        m = _PARTITION.match(line)
        if m:
            part = m.group(1)
        s = _TILE_STORE.search(line)
        if s and part is not None:
            desc = re.sub(r"_\d+$", "", s.group(1))  # per-region renames of one captured descriptor (%o_d0_34)
            seen.setdefault((desc, s.group(2)), set()).add(part)
    return sorted(f"{d}[{r}] x{len(p)}" for (d, r), p in seen.items() if len(p) > 1)


# ---------------------------------------------------------------------------------------------------------------------
# PTX: whole-kernel instruction histogram (the ground truth of what the GPU executes)
# ---------------------------------------------------------------------------------------------------------------------

_BITS = re.compile(r"^[bsuf](8|16|32|64|128)$")


def access_width(opcode: str) -> int:
    """Bytes moved by one `ld.global...` / `st.global...` instruction: vector length x element bits / 8."""
    vec, bits = 1, None
    for part in opcode.split("."):
        if re.fullmatch(r"v(2|4|8)", part):
            vec = int(part[1:])
        m = _BITS.match(part)
        if m:
            bits = int(m.group(1))
    if bits is None:
        raise ValueError(f"no element type in {opcode!r}")
    return vec * bits // 8


_CP_ASYNC = re.compile(
    r"cp\.async\.(?:ca|cg)\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def ptx_memory(ptx: str) -> dict:
    """Histogram of global memory instructions in the PTX: `ld` / `st` by bytes per instruction, cp.async by bytes,
    TMA (cp.async.bulk.tensor) loads and stores; plus MMA instructions and setmaxnreg (warp specialization)."""
    body = "\n".join(line.split("//")[0] for line in ptx.splitlines())
    ld, st, cp = Counter(), Counter(), Counter()
    for op in re.findall(r"\bld\.global[\w.:]*", body):
        ld[access_width(op)] += 1
    for op in re.findall(r"\bst\.global[\w.:]*", body):
        st[access_width(op)] += 1
    for size in _CP_ASYNC.findall(body):
        cp[int(size, 0)] += 1
    return dict(
        ld_global={str(k): v for k, v in sorted(ld.items())},
        st_global={str(k): v for k, v in sorted(st.items())},
        cp_async={str(k): v for k, v in sorted(cp.items())},
        # shared::cluster (triton 3.6) or shared::cta (3.9) destination
        tma_load=len(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.shared::(?:cluster|cta)\.global", body)),
        tma_store=len(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.global\.shared", body)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", body)),
        mma_sync=len(re.findall(r"\bmma\.sync\b", body)),
        setmaxnreg=len(re.findall(r"\bsetmaxnreg\b", body)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# LLVM IR: each global access attributed to the kernel argument its pointer derives from
# ---------------------------------------------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w.$-]+)\s*=\s*(.*)$")
_PTR_OPERAND = re.compile(r"ptr addrspace\(1\)(?:\s+(?:noundef|nonnull|align \d+|readonly|readnone|nofree|"
                          r"captures\([^)]*\)|dereferenceable\(\d+\)))*\s+(%[\w.$-]+)")
_LLVM_TY_BYTES = {"half": 2, "bfloat": 2, "float": 4, "double": 8}


def _llvm_type_bytes(ty: str) -> int | None:
    ty = ty.strip()
    m = re.fullmatch(r"<(\d+) x (\w+)>", ty)
    n, base = (int(m.group(1)), m.group(2)) if m else (1, ty)
    if base in _LLVM_TY_BYTES:
        return n * _LLVM_TY_BYTES[base]
    m = re.fullmatch(r"i(\d+)", base)
    return n * max(int(m.group(1)) // 8, 1) if m else None


def _kernel_params(llir: str) -> list[str]:
    m = re.search(r"^define\b[^@]*@[\w.$\"]+\(", llir, re.M)
    if not m:
        raise ValueError("no define in the LLVM IR")
    params = []
    for p in _split_top(_balanced(llir, m.end() - 1)):
        name = re.search(r"(%[\w.$-]+)\s*$", p.strip())
        params.append(name.group(1) if name else None)
    return params


def _access_sites(rhs: str):
    """Yield (kind, bytes, pointer operand) for every global access in one instruction's right-hand side."""
    if " asm " in rhs or rhs.startswith("asm ") or "asm sideeffect" in rhs:
        text = re.search(r'asm (?:sideeffect )?(?:inteldialect )?"((?:[^"\\]|\\.)*)"', rhs)
        text = (text.group(1) if text else "").replace("\\0A", "\n").replace("\\09", " ")
        ptrs = _PTR_OPERAND.findall(rhs)
        ptr = ptrs[0] if ptrs else None
        if "cp.async.bulk.tensor" in text:
            yield ("tma_load" if ".global.shared" not in text else "tma_store"), 0, ptr
            return
        cp = _CP_ASYNC.search(text)
        if cp:
            yield "cp_async", int(cp.group(1), 0), ptr
            return
        for op in re.findall(r"\bld\.global[\w.:]*", text):
            yield "ld", access_width(op), ptr
        for op in re.findall(r"\bst\.global[\w.:]*", text):
            yield "st", access_width(op), ptr
        return
    m = re.match(r"(?:tail |musttail |notail )?call [^@]*@llvm\.nvvm\.cp\.async\.(?:ca|cg)\.shared\.global\.(\d+)", rhs)
    if m:
        ptrs = _PTR_OPERAND.findall(rhs)
        yield "cp_async", int(m.group(1)), ptrs[0] if ptrs else None
        return
    if re.match(r"(?:tail )?call [^@]*@llvm\.nvvm\.cp\.async\.bulk\.tensor", rhs):
        yield ("tma_store" if ".s2g." in rhs or ".global.shared" in rhs else "tma_load"), 0, None
        return
    m = re.match(r"load (?:volatile |atomic )?([^,]+), ptr addrspace\(1\) (%[\w.$-]+)", rhs)
    if m:
        size = _llvm_type_bytes(m.group(1))
        if size:
            yield "ld", size, m.group(2)
        return


def _store_sites(line: str):
    m = re.match(r"\s*store (?:volatile |atomic )?([^%]+?) (%[\w.$-]+|[-\w.]+), ptr addrspace\(1\) (%[\w.$-]+)", line)
    if m:
        size = _llvm_type_bytes(m.group(1))
        if size:
            yield "st", size, m.group(3)


def llir_accesses(llir: str, arg_names: list[str]) -> list[dict]:
    """Every global load/store/cp.async/TMA site in the kernel's LLVM IR, with its bytes per instruction and the kernel
    arguments its pointer is derived from (walking getelementptr / phi / select chains back to the parameters).

    Returns one dict per (kind, bytes, args) with the number of static sites."""
    params = _kernel_params(llir)
    pname = {p: (arg_names[i] if i < len(arg_names) else f"param{i}") for i, p in enumerate(params) if p}
    defs: dict[str, str] = {}
    lines = llir.splitlines()
    for line in lines:
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)

    memo: dict[str, frozenset] = {}

    def roots(v: str | None) -> frozenset:
        if v is None:
            return frozenset()
        if v in pname:
            return frozenset([pname[v]])
        if v in memo:
            return memo[v]
        memo[v] = frozenset()  # cycle guard (loop phis)
        rhs = defs.get(v, "")
        if rhs.startswith("phi "):
            ops = re.findall(r"\[\s*(%[\w.$-]+)\s*,", rhs)
        else:
            ops = _PTR_OPERAND.findall(rhs)
        out = frozenset().union(*(roots(o) for o in ops)) if ops else frozenset()
        memo[v] = out
        return out

    sites = Counter()
    for line in lines:
        m = _DEF.match(line)
        found = list(_access_sites(m.group(2))) if m else []
        if not m:
            s = line.strip()
            if s.startswith(("call ", "tail call ")):
                found = list(_access_sites(s))
            elif s.startswith("store "):
                found = list(_store_sites(line))
        for kind, size, ptr in found:
            sites[(kind, size, tuple(sorted(roots(ptr))))] += 1
    return [dict(kind=k, bytes=b, args=list(a), sites=n) for (k, b, a), n in sorted(sites.items())]
